"""`eval`: the pipeline's validation metrics of the input model, as a stage of its own; `generate`: a greedy
sample from the PyTorch model with transformers' `generate`."""

from __future__ import annotations

import time

from ..stages import Stage, register


def run_eval(model, cfg, ctx):
    return model, {}  # the pipeline measures every stage's model on the run's held-out blocks


def run_generate(model, cfg, ctx):
    gen = ctx.config("generate")
    tok = ctx.tokenizer
    ids = tok(gen.prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    out = model.eval().generate(ids, max_new_tokens=gen.max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    secs = time.perf_counter() - t0
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\n[codexmini] sample ({ctx.folder.name}):\n{gen.prompt}{text}\n", flush=True)
    return model, {"prompt": gen.prompt, "sample": text,
                   "generate_tokens_per_s": (out.shape[1] - ids.shape[1]) / secs}


def check_generate(cfg, ctx) -> None:
    if ctx.config("generate").max_new_tokens < 1:
        raise ValueError(f"generate.max_new_tokens must be >= 1, got {ctx.config('generate').max_new_tokens}")


register(Stage(name="eval", run=run_eval, uses=("data",), produces_model=False,
               help="validation metrics of a model folder"))
register(Stage(name="generate", run=run_generate, uses=("generate",), check=check_generate, produces_model=False,
               help="a greedy sample from a model folder (or stream from a .cmx file)"))

"""The export stage: write the `.cmx` file, check the runtime's logits against PyTorch's, time it, sample it.

The export owns its checks: a file whose runtime logits disagree with the model (or are not finite) is refused,
so a broken model never ships with exit code 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import StageFailed
from ..files import sha256_file
from ..models.quantized import weight_count
from ..stages import Stage, register
from .gguf import check_llama_shaped, write_llama_gguf
from .to_cmx import ExportConfig, check_export_config, export_cmx


def runtime_check(model, path, ids: torch.Tensor, kernels: str) -> dict:
    """Runtime logits on `ids` (prefill half, then token by token) against PyTorch's: with fp32 activations and
    KV caches (exact) and with the int kernels' fast inputs and the default caches (what users run). Returns
    diffs, NLLs and the fast runtime."""
    from ..runtime import Runtime

    with torch.no_grad():
        want = model.eval()(input_ids=ids[None]).logits[0].float()
    diffs, nll = {}, {"pytorch": float(F.cross_entropy(want[:-1], ids[1:]))}
    rt = None
    for act in ("float32", "auto"):
        rt = Runtime(path, kernels=kernels, act_dtype=act, kv_dtype="float32" if act == "float32" else "auto")
        s = rt.new_session()
        half = len(ids) // 2
        got = torch.cat([rt.forward(ids[:half], s, all_logits=True)]
                        + [rt.forward(ids[t:t + 1], s, all_logits=True) for t in range(half, len(ids))])
        diffs[act] = float((got - want).abs().max())
        nll[act] = float(F.cross_entropy(got[:-1], ids[1:]))
    return {"diffs": diffs, "nll": nll, "runtime": rt}


def run_export(model, cfg: ExportConfig, ctx):
    from ..runtime import SamplingConfig
    from ..runtime.bench import bench_context

    gen = ctx.config("generate")
    path = export_cmx(model, ctx.tokenizer, ctx.folder / "model.cmx", cfg.dtype)
    check = runtime_check(model, path, ctx.data.val[0, : cfg.check_tokens], cfg.kernels)
    diffs, nll, rt = check["diffs"], check["nll"], check["runtime"]
    # The fp32 path must match the model up to the file's float precision; NLLs must be finite and close.
    bad = [f"{k} = {v}" for k, v in {**diffs, **{f"nll_{k}": v for k, v in nll.items()}}.items()
           if not math.isfinite(v)]
    if not bad and abs(nll["float32"] - nll["pytorch"]) > cfg.check_nll_tolerance:
        bad.append(f"runtime NLL {nll['float32']:.4f} vs PyTorch {nll['pytorch']:.4f} (tolerance "
                   f"export.check_nll_tolerance = {cfg.check_nll_tolerance})")
    if bad:
        path.unlink(missing_ok=True)
        raise StageFailed(f"export: the runtime check failed ({'; '.join(bad)}); {path.name} was not kept")
    speed = bench_context(rt, cfg.bench_context, cfg.bench_decode_tokens)
    text = rt.generate(gen.prompt, SamplingConfig(max_tokens=gen.max_new_tokens))
    print(f"\n[codexmini] runtime sample ({path.name}, {speed['decode_tokens_per_s']:.1f} tok/s decode):\n"
          f"{gen.prompt}{text}\n", flush=True)
    size = path.stat().st_size
    metrics = {"file_bytes": size, "cmx_sha256": sha256_file(path), "bits_per_weight": 8 * size / weight_count(model),
               "runtime_max_abs_logit_diff": diffs["float32"], "runtime_max_abs_logit_diff_fast_act": diffs["auto"],
               "runtime_act_dtype": rt.act_dtype, "check_nll": nll,
               "runtime_tokens_per_s": speed["decode_tokens_per_s"],
               "runtime_prefill_tokens_per_s": speed["prefill_tokens_per_s"], "runtime_ttft_s": speed["ttft_s"],
               "runtime_kernels": rt.kernels, "runtime_load_s": rt.load_seconds,
               "prompt": gen.prompt, "sample": text}
    if cfg.gguf:
        try:
            check_llama_shaped(model)
        except ValueError as err:
            metrics["gguf_skipped"] = str(err)
        else:
            gguf_path = write_llama_gguf(model, ctx.tokenizer, ctx.folder / "model.gguf")
            metrics["gguf_bytes"] = gguf_path.stat().st_size
    return model, metrics


def check(cfg: ExportConfig, ctx) -> None:
    check_export_config(cfg)


register(Stage(name="export", run=run_export, schema=ExportConfig, uses=("generate", "data"), check=check,
               produces_model=False, help="write the .cmx file, check it with the runtime, time it"))

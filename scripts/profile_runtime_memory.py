"""Where a runtime model's memory goes: resident set, its high-water mark, anonymous vs file-backed pages, and (with
glibc) the heap's bytes in use vs held free, after loading and after each prompt; all relative to the process
before the model is loaded.

    .venv/bin/python scripts/profile_runtime_memory.py MODEL.cmx [--contexts 16,1024,4096] [--prefill-chunk 512]

Each context's session stays alive, as in `bench_runtime.py`. "heap free" is memory the allocator holds but does
not use (fragmentation, or the top of the heap after a prompt's temporaries); "file" counts the model's mapped
pages and the code pages of libraries used for the first time.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mallinfo():
    """(bytes in use, bytes free in the main heap) from glibc's mallinfo2; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--contexts", default="16,1024,4096")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--kernels", default="auto")
    args = p.parse_args()
    from codexmini.runtime import Runtime, native

    if args.kernels in ("auto", "cmx"):
        native.load()  # code, not model memory
    base, heap0 = _status(), _mallinfo()
    print("| after | RSS MB | peak RSS MB | anon MB | file MB | heap in use MB | heap free MB |")
    print("|---|---|---|---|---|---|---|")

    def row(what: str) -> None:
        now, heap = _status(), _mallinfo()
        cells = [(now[k] - base[k]) / 1e6 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")]
        cells += [(heap[0] - heap0[0]) / 1e6, heap[1] / 1e6] if heap and heap0 else []
        print(f"| {what} | " + " | ".join(f"{c:.1f}" for c in cells) + (" | - | - |" if not heap else " |"))

    rt = Runtime(args.model, kernels=args.kernels, prefill_chunk=args.prefill_chunk)
    row("load")
    g = torch.Generator().manual_seed(0)
    sessions = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        s = rt.new_session()
        rt.forward(torch.randint(0, rt.embed.shape[0], (ctx,), generator=g), s)
        sessions.append(s)
        row(f"prompt of {ctx}")
    for s in sessions:
        for _ in range(8):
            rt.forward([1], s)
    row("8 decoded tokens each")
    states = sum(s.nbytes() for s in sessions)
    print(f"\nfile {Path(args.model).stat().st_size / 1e6:.1f} MB; sessions {states / 1e6:.1f} MB")


if __name__ == "__main__":
    main()

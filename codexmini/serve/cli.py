"""`codexmini serve MODEL.cmx [NAME=MODEL.cmx ...]`: the OpenAI-compatible server on uvicorn.

    codexmini serve runs/quickstart/default/06-export/model.cmx            # http://127.0.0.1:8000/v1
    codexmini serve coder=a.cmx chat=b.cmx --parallel 8 --api-key-file key.txt

`add_parser(subparsers)` adds the subcommand to codexmini's CLI; `main(argv)` runs it alone
(`python -m codexmini.serve`). Importing this module imports neither FastAPI nor uvicorn (they come with the
`serve` extra and are needed only to run).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path


def model_specs(items: list[str]) -> dict[str, Path]:
    """`PATH` or `NAME=PATH` -> {name: path}; a bare path is served under its file stem."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path:
            raise ValueError(f"model {item!r}: give a .cmx file or NAME=PATH")
        if name in out:
            raise ValueError(f"two models are named {name!r}: name them with NAME=PATH")
        if not Path(path).is_file():
            raise ValueError(f"model {name!r}: no such file {path}")
        out[name] = Path(path)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..runtime.kernels import KERNEL_MODES
    from ..runtime.model import KV_DTYPE_CHOICES
    from .config import ServeConfig

    d = ServeConfig()
    p.add_argument("models", nargs="+", metavar="MODEL", help="a .cmx file (served under its file stem) or NAME=PATH")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require `Authorization: Bearer KEY` (visible to other local users in ps: "
                                       "prefer --api-key-file)")
    key.add_argument("--api-key-file", type=Path, help="read the key from the first line of this file")
    p.add_argument("--parallel", type=int, default=d.parallel, help="sequences decoded together, per model")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting for a slot before the server answers 503, per model")
    p.add_argument("--prefix-cache-mb", type=float, default=d.prefix_cache_mb,
                   help="memory for reusing earlier requests' prefixes, per model (0: off)")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt tokens per step (linear-state checkpoints are taken at these boundaries)")
    p.add_argument("--kernels", default=d.kernels, choices=KERNEL_MODES, help="runtime kernels (see `generate`)")
    p.add_argument("--kv-dtype", default=d.kv_dtype, choices=KV_DTYPE_CHOICES,
                   help="the KV caches (see `generate`): float16 halves their memory, so the prefix cache holds "
                        "twice the tokens")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object (codexmini's CLI)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server over .cmx files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def api_key(args) -> str | None:
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--api-key-file: {err}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    return args.api_key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    """Serve until interrupted; 1 when a model fails to load."""
    from .config import ServeConfig

    specs = model_specs(args.models)
    cfg = ServeConfig(parallel=args.parallel, max_queue=args.max_queue, prefix_cache_mb=args.prefix_cache_mb,
                      prefill_chunk=args.prefill_chunk, kernels=args.kernels, kv_dtype=args.kv_dtype,
                      threads=args.threads,
                      api_key=api_key(args))
    cfg.check()
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    try:
        import uvicorn

        from .app import build_app
    except ImportError as err:
        raise ImportError(f"codexmini serve needs FastAPI and uvicorn ({err}): pip install 'codexmini[serve]'") \
            from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not _loopback(args.host) and cfg.api_key is None:
        logging.getLogger("codexmini.serve").warning(
            "serving on %s without an API key: anyone who can reach this port can use the models", args.host)
    holder: dict = {}
    app = build_app(specs, cfg, on_failure=lambda: setattr(holder["server"], "should_exit", True))
    server = holder["server"] = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                                              log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run()
    state = app.state.server
    if state.state == "failed":
        print(f"codexmini serve: {state.error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="codexmini serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, ImportError) as err:
        print(f"codexmini serve: {err}", file=sys.stderr)
        return 2

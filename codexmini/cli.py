"""`codexmini` command line: a thin layer over `pipeline.run()` and the registered stages.

    codexmini run RECIPE [key=value ...]        run / resume a recipe (a name or a path to its YAML)
    codexmini ls                                recipes, config groups and stages
    codexmini validate RECIPE [key=value ...]   compose and check, run nothing
    codexmini init RECIPE DIR                   copy a recipe and the config options it picks, to edit
    codexmini STAGE MODEL_DIR [key=value ...]   one registered stage (distill, prune, quantize, export, eval, ...)
    codexmini generate MODEL.cmx --prompt TEXT  stream text from an exported model (the on-device runtime)
    codexmini bench MODEL.cmx                   runtime prefill/decode tokens/s, time to first token, memory
    codexmini report RUN_DIR                    table over a run's stages + size/perplexity plot

`--config-dir DIR` (repeatable) adds a team's own config groups and recipes, searched before the packaged ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path

COMMANDS = ("run", "ls", "validate", "init", "bench", "report", "serve")


def _compose(args, overrides=None):
    from .config import compose

    return compose(args.recipe, args.overrides if overrides is None else overrides, args.config_dir or ())


def cmd_run(args) -> int:
    from .pipeline import run
    from .report import report

    run_dir = run(_compose(args))
    print(f"\n{report(run_dir)}\nrun folder: {run_dir}")
    return 0


def cmd_validate(args) -> int:
    from omegaconf import OmegaConf

    from .pipeline import validate

    cfg = _compose(args)
    problems = validate(cfg)
    if args.show:
        print(OmegaConf.to_yaml(cfg))
    if problems:
        print(f"{args.recipe}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.recipe}: valid ({len(cfg.stages)} stages: {', '.join(s.stage for s in cfg.stages)})")
    return 0


def _comment(path: Path, index: int) -> str:
    """The index-th leading comment line of a YAML file (recipes start with their command, then a summary)."""
    lines = []
    for ln in path.read_text().splitlines():
        if not ln.startswith("#"):
            break
        lines.append(ln.lstrip("# ").strip())
    return lines[index] if len(lines) > index else ""


def _group_options(config_dirs) -> dict[str, dict[str, Path]]:
    """{group: {option: path}} over the search path, first match wins (as Hydra picks them)."""
    from .config import groups, search_path

    out: dict[str, dict[str, Path]] = {g: {} for g in ["teacher", *groups()]}
    for d in search_path(config_dirs):
        for group in sorted(p for p in d.iterdir() if p.is_dir() and p.name in out):
            for p in sorted(group.glob("*.yaml")):
                out[group.name].setdefault(p.stem, p)
    return out


def cmd_ls(args) -> int:
    from . import stages
    from .config import recipes

    print("recipes:")
    for name, p in sorted(recipes(args.config_dir or ()).items()):
        print(f"  {name:<20} {_comment(p, 1)}")
    print("config groups:")
    for group, options in _group_options(args.config_dir or ()).items():
        if options:
            print(f"  {group}/")
            for name, p in sorted(options.items()):
                print(f"    {name:<18} {_comment(p, 0)}")
    print("stages:")
    for name, s in sorted(stages.stages().items()):
        print(f"  {name:<20} {s.help}")
    return 0


def cmd_init(args) -> int:
    """Copy a recipe and every config option its defaults list picks into DIR, ready to edit and run."""
    import shutil

    import yaml

    from .config import recipe_path

    src = recipe_path(args.recipe, args.config_dir or ())
    dest = Path(args.dir)
    data = yaml.safe_load(src.read_text()) or {}
    options = _group_options(args.config_dir or ())
    copies = [(src, dest / src.name)]
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for group, option in entry.items():
                group = group.lstrip("/").split("@")[0]
                if group in options and option in options[group]:
                    copies.append((options[group][option], dest / group / f"{option}.yaml"))
    existing = [str(d) for _, d in copies if d.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --force to overwrite")
    for s, d in copies:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)
    print(f"copied {src.stem} and {len(copies) - 1} config options into {dest}/")
    print(f"edit them, then: codexmini run {dest / src.name}")
    return 0


def cmd_stage(args) -> int:
    """One stage on an existing model folder, with the same config keys as a recipe."""
    from omegaconf import OmegaConf

    from .pipeline import run
    from .report import report

    model_dir = Path(args.model_dir)
    if args.command == "generate" and model_dir.suffix == ".cmx":
        return cmd_generate_cmx(args)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    cfg = _compose(args, ["model.init=folder", f"model.path={model_dir}", f"recipe={args.command}",
                          *args.overrides])
    cfg.stages = OmegaConf.merge(cfg.stages, [{"stage": args.command}])[-1:]
    run_dir = run(cfg)
    print(report(run_dir))
    return 0


def _runtime(args):
    from .runtime import Runtime

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return Runtime(args.model_dir if hasattr(args, "model_dir") else args.model_file, kernels=args.kernels,
                   threads=args.threads, kv_dtype=args.kv_dtype)


def cmd_generate_cmx(args) -> int:
    """Stream a continuation from a .cmx file with the on-device runtime (imports no training stack)."""
    from .runtime import SamplingConfig

    if args.prompt is None:
        raise ValueError("generate on a .cmx file needs --prompt TEXT")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig) if hasattr(args, f.name)}
    cfg = SamplingConfig(**{**values, "stop": args.stop or []})
    cfg.check()
    rt = _runtime(args)
    pieces = rt.stream(args.prompt, cfg)  # checks the prompt (text, length) before anything is printed
    print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_bench(args) -> int:
    from .runtime.bench import bench, format_table

    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        raise ValueError(f"--contexts {args.contexts!r} must be comma-separated positive integers") from None
    if any(c < 1 for c in contexts) or args.decode_tokens < 1:
        raise ValueError("--contexts and --decode-tokens must be positive")
    rt = _runtime(args)
    limit = rt.config.get("max_position_embeddings")
    too_long = [c for c in contexts if isinstance(limit, int) and c + args.decode_tokens > limit]
    if too_long:
        raise ValueError(f"--contexts {','.join(map(str, too_long))} plus --decode-tokens {args.decode_tokens} exceed "
                         f"the model's {limit} positions (max_position_embeddings)")
    rows = bench(rt, contexts, args.decode_tokens)
    print(f"{args.model_file}: {rt.config['num_hidden_layers']} layers "
          f"({', '.join(sorted(set(rt.config['layer_types'])))}), kernels={rt.kernels}, "
          f"threads={__import__('torch').get_num_threads()}")
    print(format_table(rows, Path(args.model_file).stat().st_size))
    return 0


def cmd_report(args) -> int:
    from .report import report

    print(report(args.run_dir))
    return 0


def _config_dir_option(p) -> None:
    p.add_argument("--config-dir", action="append", metavar="DIR",
                   help="a folder of your own config groups and recipes, searched first (repeatable)")


def _sampling_options(p) -> None:
    """Flags for every SamplingConfig field, with its defaults (the one home of sampling defaults)."""
    from .runtime.sampling import SamplingConfig

    defaults = SamplingConfig()
    helps = {"temperature": "0 = greedy", "top_k": "0 = off", "stop": "stop string (repeatable)",
             "window_prompt": "a prompt longer than the model's positions: run only its last tokens (else refused)"}
    for f in dataclasses.fields(SamplingConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if f.name == "stop":
            p.add_argument(flag, action="append", help=helps[f.name])
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=helps.get(f.name))
        else:
            kind = int if f.type in ("int", "int | None") else float
            p.add_argument(flag, type=kind, default=value, help=helps.get(f.name, f"default {value}"))


def build_parser() -> argparse.ArgumentParser:
    from . import stages

    parser = argparse.ArgumentParser(prog="codexmini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run or resume a recipe")
    p.add_argument("recipe", help="a recipe name (codexmini ls) or a path to a YAML file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=50")
    _config_dir_option(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="compose a recipe and check it without running anything")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--show", action="store_true", help="print the composed config")
    _config_dir_option(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("ls", help="list recipes, config groups and stages")
    _config_dir_option(p)
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("init", help="copy a recipe and its config options into a folder to edit")
    p.add_argument("recipe")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")
    _config_dir_option(p)
    p.set_defaults(func=cmd_init)
    for name, stage in sorted(stages.stages().items()):
        if name in COMMANDS:
            continue
        extra = " (or stream text from a .cmx file)" if name == "generate" else ""
        p = sub.add_parser(name, help=f"{stage.help or name} on an existing model folder{extra}")
        p.add_argument("model_dir", help="a model folder" + (", or a .cmx file" if name == "generate" else ""))
        p.add_argument("overrides", nargs="*", help="config keys, as in a recipe (e.g. trainer.max_steps=20)")
        p.add_argument("--recipe", default="quickstart", help="recipe whose teacher/data/config to use")
        _config_dir_option(p)
        p.set_defaults(func=cmd_stage)
        if name == "generate":
            p.add_argument("--prompt", help=".cmx: the prompt text")
            _sampling_options(p)
            _runtime_options(p)
    p = sub.add_parser("bench", help="runtime speed and memory of a .cmx file")
    p.add_argument("model_file")
    p.add_argument("--contexts", default="16,1024,4096", help="comma-separated prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=32)
    _runtime_options(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="table and plot over a run's stages")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _runtime_options(p) -> None:
    from .runtime.kernels import KERNEL_MODES
    from .runtime.model import KV_DTYPE_CHOICES

    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="int8/int4 matmuls: auto (cmx where it builds, else native), codexmini's own CPU kernels "
                        "(cmx), torch's packed kernels (native), or weights widened to fp32 at load (dequant)")
    p.add_argument("--kv-dtype", default="auto", choices=KV_DTYPE_CHOICES,
                   help="the KV caches: auto (float16 where codexmini's kernels attend in AVX-512, else float32), "
                        "float16 or float32")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = build_parser()
    # Overrides may come before or after options (`eval DIR --recipe r key=v`); argparse leaves late ones over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from .errors import CodexMiniError

    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, CodexMiniError, HydraException,
            OmegaConfBaseException, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError)) and \
                err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Bad input (recipe name, key, value, path), a damaged file or a full disk: a clear message instead of a
        # traceback.
        message = err.args[0] if isinstance(err, KeyError) and err.args else \
            err.strerror if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) else err
        print(f"codexmini: error: {message}", file=sys.stderr)
        if err.__cause__ is not None and not isinstance(err, OSError):
            print(f"  {err.__cause__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

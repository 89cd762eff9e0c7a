"""`codexmini` command line: a thin layer over `pipeline.run()` and the stage functions.

    codexmini run RECIPE [key=value ...]        run / resume a recipe (Hydra overrides)
    codexmini ls                                recipes and config groups
    codexmini validate RECIPE [key=value ...]   compose and check, run nothing
    codexmini distill|prune|quantize|export|eval|generate MODEL_DIR [key=value ...]
                                                one stage on an existing model folder
    codexmini generate MODEL.cmx --prompt TEXT  stream text from an exported model (the on-device runtime)
    codexmini bench MODEL.cmx                   runtime prefill/decode tokens/s, time to first token, memory
    codexmini report RUN_DIR                    table over a run's stages + size/perplexity plot
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SINGLE_STAGES = ("distill", "prune", "quantize", "export", "eval", "generate")


def _compose(recipe, overrides):
    from .config import compose

    return compose(recipe, overrides)


def cmd_run(args) -> int:
    from .pipeline import run
    from .report import report

    cfg = _compose(args.recipe, args.overrides)
    run_dir = run(cfg)
    print(f"\n{report(run_dir)}\nrun folder: {run_dir}")
    return 0


def cmd_validate(args) -> int:
    from omegaconf import OmegaConf

    from .pipeline import validate

    cfg = _compose(args.recipe, args.overrides)
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


def cmd_ls(args) -> int:
    from .config import CONFIG_DIR, RECIPE_DIR

    print("recipes:")
    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        print(f"  {p.stem:<20} {_comment(p, 1)}")
    print("config groups:")
    for group in sorted(d for d in CONFIG_DIR.iterdir() if d.is_dir()):
        print(f"  {group.name}/")
        for p in sorted(group.glob("*.yaml")):
            print(f"    {p.stem:<18} {_comment(p, 0)}")
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
        raise SystemExit(f"{model_dir} is not a model folder (no config.json)")
    cfg = _compose(args.recipe, ["model.init=folder", f"model.path={model_dir}", f"recipe={args.command}",
                                 *args.overrides])
    cfg.stages = OmegaConf.merge(cfg.stages, [{"stage": args.command}])[-1:]
    run_dir = run(cfg)
    print(report(run_dir))
    return 0


def _runtime(args):
    from .runtime import Runtime

    return Runtime(args.model_dir if hasattr(args, "model_dir") else args.model_file, kernels=args.kernels,
                   threads=args.threads)


def cmd_generate_cmx(args) -> int:
    """Stream a continuation from a .cmx file with the on-device runtime (imports no training stack)."""
    from .runtime import SamplingConfig

    if args.prompt is None:
        raise ValueError("generate on a .cmx file needs --prompt TEXT")
    rt = _runtime(args)
    cfg = SamplingConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or [],
                         seed=args.seed)
    print(args.prompt, end="", flush=True)
    for piece in rt.stream(args.prompt, cfg):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_bench(args) -> int:
    from .runtime.bench import bench, format_table

    rt = _runtime(args)
    rows = bench(rt, [int(c) for c in args.contexts.split(",")], args.decode_tokens)
    print(f"{args.model_file}: {rt.config['num_hidden_layers']} layers "
          f"({', '.join(sorted(set(rt.config['layer_types'])))}), kernels={rt.kernels}, "
          f"threads={__import__('torch').get_num_threads()}")
    print(format_table(rows, Path(args.model_file).stat().st_size))
    return 0


def cmd_report(args) -> int:
    from .report import report

    print(report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codexmini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run or resume a recipe")
    p.add_argument("recipe", help="a name from recipes/ (codexmini ls) or a path to a YAML file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=50")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="compose a recipe and check it without running anything")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--show", action="store_true", help="print the composed config")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("ls", help="list recipes and config groups")
    p.set_defaults(func=cmd_ls)
    for name in SINGLE_STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage on an existing model folder"
                           + (" (or stream text from a .cmx file)" if name == "generate" else ""))
        p.add_argument("model_dir", help="a model folder" + (", or a .cmx file" if name == "generate" else ""))
        p.add_argument("overrides", nargs="*", help="config keys, as in a recipe (e.g. trainer.max_steps=20)")
        p.add_argument("--recipe", default="quickstart", help="recipe whose teacher/data/config to use")
        p.set_defaults(func=cmd_stage)
        if name == "generate":
            p.add_argument("--prompt", help=".cmx: the prompt text")
            p.add_argument("--max-tokens", type=int, default=128)
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            p.add_argument("--top-k", type=int, default=0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--repetition-penalty", type=float, default=1.0)
            p.add_argument("--stop", action="append", help="stop string (repeatable)")
            p.add_argument("--seed", type=int)
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
    return parser


def _runtime_options(p) -> None:
    p.add_argument("--kernels", default="auto", choices=("auto", "cmx", "native", "dequant"),
                   help="int8/int4 matmuls: auto (cmx where it builds, else native), codexmini's own CPU kernels "
                        "(cmx), torch's packed kernels (native), or weights widened to fp32 at load (dequant)")
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
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, HydraException, OmegaConfBaseException) as err:
        # Bad input (recipe name, key, value, path): a clear message instead of a traceback.
        print(f"codexmini: error: {err}", file=sys.stderr)
        if err.__cause__ is not None:
            print(f"  {err.__cause__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

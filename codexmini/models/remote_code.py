"""Remote code: the student's source written into every saved folder, so that transformers loads the folder with
`trust_remote_code=True` where codexmini is not installed (lm-eval's `--model hf`, a colleague's notebook, the hub).

transformers' remote-code loader copies the file `auto_map` names and, following `from .name import ...` lines,
the files it imports: one flat folder, no packages. The student is written as packages (`codexmini.models`
computing with `codexmini.ops`), so its source is flattened: starting from the modules that define the config and
the model, every codexmini module they import (relatively or absolutely, at module level or inside a function)
becomes one file whose codexmini imports are rewritten as flat relative ones, the rest of its text unchanged:

    codexmini/models/configuration.py  ->  configuration_codexmini.py   (auto_map: AutoConfig)
    codexmini/models/modeling.py       ->  modeling_codexmini.py        (auto_map: AutoModel, AutoModelForCausalLM)
    codexmini/models/attention.py      ->  codexmini_models_attention.py
    codexmini/ops/linear_attn.py       ->  codexmini_ops_linear_attn.py

Whatever the folder's loader imports must be there without codexmini, so the closure may hold only modules of
`codexmini.models` and `codexmini.ops`, and these may import, outside codexmini, only the standard library, torch,
transformers, safetensors and huggingface_hub (which transformers itself needs). Anything else (a stage, Hydra,
the pipeline) is refused with the chain of imports that pulled it in. An import inside a `try:` block is taken as
optional (the loader skips those too) and left alone.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic

# The modules that define what `auto_map` points at, and the file each becomes (transformers' usual names, so
# the folder reads like any remote-code model on the hub).
ROOTS = {"codexmini.models.configuration": "configuration_codexmini",
         "codexmini.models.modeling": "modeling_codexmini"}
AUTO_MAP = {"AutoConfig": "configuration_codexmini.CodexMiniConfig",
            "AutoModel": "modeling_codexmini.CodexMiniModel",
            "AutoModelForCausalLM": "modeling_codexmini.CodexMiniForCausalLM"}
ALLOWED_PACKAGES = ("codexmini.models", "codexmini.ops")
ALLOWED_EXTERNAL = frozenset({"torch", "transformers", "safetensors", "huggingface_hub"}) | sys.stdlib_module_names
# Every flat file but the roots starts with this, so a re-save can tell its own stale files from the user's.
FLAT_PREFIX = "codexmini_"

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../codexmini
# What transformers' loader follows (dynamic_module_utils.get_relative_imports): a line starting `from .name import`.
_LOADER_IMPORT = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)


class RemoteCodeError(ValueError):
    """The student's source cannot be flattened into a folder that loads without codexmini."""


@dataclass
class _Module:
    name: str  # codexmini.ops.linear_attn
    path: Path
    is_package: bool
    imported_by: str | None  # the first module found importing it, for error messages
    source: bytes = b""  # read once, so the edits' offsets match the text they are applied to
    edits: list[tuple[int, int, str]] = field(default_factory=list)  # (start byte, end byte, new text)


def flat_name(module: str) -> str:
    """The file (without `.py`) that `module` becomes: `codexmini.ops.linear_attn` -> `codexmini_ops_linear_attn`."""
    return ROOTS.get(module, module.replace(".", "_"))


def flatten(roots=tuple(ROOTS)) -> dict[str, str]:
    """The flattened source of `roots` and everything of codexmini they import: {file name: text}.

    Raises:
        RemoteCodeError: the closure leaves `codexmini.models` / `codexmini.ops`, imports a third-party package
            other than torch / transformers / safetensors / huggingface_hub, or uses an import form that cannot be
            flattened (`import codexmini.x` without `as`, an import sharing its line with other code).
    """
    modules: dict[str, _Module] = {}
    queue = [(name, None) for name in roots]
    while queue:
        name, importer = queue.pop(0)
        if name in modules:
            continue
        _check_allowed(name, importer, modules)
        path, is_package = _source_of(name, importer)
        module = modules[name] = _Module(name, path, is_package, importer)
        queue.extend((dep, name) for dep in _scan(module))

    files: dict[str, str] = {}
    for module in modules.values():
        file = f"{flat_name(module.name)}.py"
        if file in files:
            raise RemoteCodeError(f"two modules flatten to {file}; rename one of them")
        files[file] = _render(module)
    _check_loader_sees_everything(files)
    return files


def write_remote_code(folder: str | Path) -> list[Path]:
    """Write the flattened source into `folder` (the caller puts `AUTO_MAP` into its config.json).

    Flat files of an earlier save that the code no longer has are removed, so the folder holds one version.
    """
    folder = Path(folder)
    files = flatten()
    for stale in folder.glob(f"{FLAT_PREFIX}*.py"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for file, text in files.items():
        write_atomic(folder / file, text)
        written.append(folder / file)
    return written


# --------------------------------------------------------------------------- finding the closure
def _check_allowed(name: str, importer: str | None, modules: dict[str, _Module]) -> None:
    if any(name == pkg or name.startswith(pkg + ".") for pkg in ALLOWED_PACKAGES):
        return
    chain = [name]
    while importer is not None:
        chain.append(importer)
        importer = modules[importer].imported_by
    raise RemoteCodeError(
        f"the remote code of a saved student would need {name} ({' <- '.join(chain)}); only "
        f"{' and '.join(ALLOWED_PACKAGES)} may be imported by the model code, so that a folder loads with "
        "trust_remote_code=True without codexmini. Move what the model needs into codexmini.ops or codexmini.models"
    )


def _source_of(name: str, importer: str | None) -> tuple[Path, bool]:
    parts = name.split(".")[1:]
    base = _PACKAGE_DIR.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    raise RemoteCodeError(f"{importer or 'the remote code'} imports {name}, which has no source file in {_PACKAGE_DIR}")


def _is_module(name: str) -> bool:
    base = _PACKAGE_DIR.joinpath(*name.split(".")[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_codexmini(name: str) -> bool:
    return name == "codexmini" or name.startswith("codexmini.")


def _scan(module: _Module) -> list[str]:
    """Record the rewrites of `module`'s codexmini imports and return the modules they import."""
    source = module.source = module.path.read_bytes()
    tree = ast.parse(source, filename=str(module.path))
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    optional = _nodes_in_try_blocks(tree)
    deps: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if not _is_codexmini(target):
                _check_external(module, node, target.split(".")[0], node in optional)
                continue
            statements = []
            names = []
            for alias in node.names:
                if alias.name != "*" and _is_module(f"{target}.{alias.name}"):
                    # `from ..ops import rope`: the alias is a module object.
                    sub = f"{target}.{alias.name}"
                    deps.append(sub)
                    statements.append(_module_import(sub, alias.asname or alias.name))
                else:
                    names.append(alias)
            if names:
                deps.append(target)
                listed = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in names)
                statements.insert(0, f"from .{flat_name(target)} import {listed}")
            module.edits.append(_edit(module, node, source, line_starts, "; ".join(statements)))
        elif isinstance(node, ast.Import):
            inside = [a for a in node.names if _is_codexmini(a.name)]
            for alias in node.names:
                if not _is_codexmini(alias.name):
                    _check_external(module, node, alias.name.split(".")[0], node in optional)
            if not inside:
                continue
            if len(inside) != len(node.names) or any(a.asname is None for a in inside):
                raise RemoteCodeError(
                    f"{module.path}:{node.lineno}: `import {', '.join(a.name for a in node.names)}` cannot be "
                    "flattened (the name `codexmini` does not exist in a saved folder); write "
                    "`from codexmini.x import y`, `import codexmini.x.y as z` or a relative import"
                )
            for alias in inside:
                deps.append(alias.name)
            statements = [_module_import(a.name, a.asname) for a in inside]
            module.edits.append(_edit(module, node, source, line_starts, "; ".join(statements)))
    return deps


def _absolute(module: _Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    base = module.name if module.is_package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    if not base:
        raise RemoteCodeError(f"{module.path}:{node.lineno}: relative import beyond the top-level package")
    return f"{base}.{node.module}" if node.module else base


def _check_external(module: _Module, node: ast.stmt, top: str, optional: bool) -> None:
    if top in ALLOWED_EXTERNAL or optional:
        return
    allowed = ", ".join(sorted(ALLOWED_EXTERNAL - sys.stdlib_module_names))
    raise RemoteCodeError(
        f"{module.path}:{node.lineno} imports {top}, which a folder loaded with trust_remote_code cannot count on: "
        f"the model code may import only the standard library and {allowed} (or import it inside a try block, as "
        "an optional dependency)"
    )


def _nodes_in_try_blocks(tree: ast.AST) -> set[ast.AST]:
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)):
            for stmt in node.body:
                inside.update(ast.walk(stmt))
    return inside


def _module_import(module: str, bound_name: str) -> str:
    # transformers' loader copies only the files named on `from .name import` lines, and `from . import name` is
    # not one of them: the first statement makes the loader see the file, the second binds the module object.
    flat = flat_name(module)
    return f"from .{flat} import __name__ as _{flat}_name; from . import {flat} as {bound_name}"


def _edit(module: _Module, node: ast.stmt, source: bytes, line_starts: list[int], text: str):
    # ast offsets are in UTF-8 bytes, hence the byte arithmetic.
    start = line_starts[node.lineno - 1] + node.col_offset
    end = line_starts[node.end_lineno - 1] + node.end_col_offset
    if source[line_starts[node.lineno - 1]:start].strip():
        raise RemoteCodeError(f"{module.path}:{node.lineno}: put this import on a line of its own: transformers' "
                              "loader only follows imports that start a line")
    return start, end, text


# --------------------------------------------------------------------------- writing the files
def _render(module: _Module) -> str:
    source = module.source
    for start, end, text in sorted(module.edits, reverse=True):
        source = source[:start] + text.encode() + source[end:]
    relative = module.path.relative_to(_PACKAGE_DIR.parent).as_posix()
    header = (f"# Written by codexmini: {relative} with its codexmini imports made flat, so that this folder\n"
              "# loads with trust_remote_code=True where codexmini is not installed. Edit the source, not this copy.\n")
    text = header + source.decode()
    ast.parse(text, filename=f"{flat_name(module.name)}.py")  # a rewrite that broke the syntax fails here, not at load
    return text


def _check_loader_sees_everything(files: dict[str, str]) -> None:
    """Every relative import left in the files names a flat file that is there (what transformers' loader needs)."""
    for file, text in files.items():
        for target in _LOADER_IMPORT.findall(text):
            if f"{target}.py" not in files:
                raise RemoteCodeError(f"{file} imports .{target}, which is not among the flattened files")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level and (node.level > 1 or
                                                                    (node.module or "") and "." in node.module):
                raise RemoteCodeError(f"{file}:{node.lineno} still has a nested relative import")

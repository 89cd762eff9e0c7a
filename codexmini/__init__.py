"""codexmini: distil, prune, quantize and ship small language models.

Importing codexmini registers the student (`model_type` "codexmini") with transformers' Auto classes, without
importing transformers: if transformers is already imported it happens at once, otherwise right after transformers
is first imported. So `import codexmini.runtime` stays light (torch, safetensors, tokenizers) and works where
transformers is not installed, while `import codexmini` then `AutoModelForCausalLM.from_pretrained(folder)` works
with no other codexmini import.
"""

from __future__ import annotations

import importlib
import sys
import warnings

__version__ = "0.1.0"
__all__ = ["CodexMiniCache", "CodexMiniConfig", "CodexMiniForCausalLM", "CodexMiniModel", "__version__"]


def __getattr__(name: str):
    # The model classes need transformers; importing them lazily keeps `codexmini.runtime` (torch, safetensors and
    # tokenizers only) importable on a device without it.
    if name in __all__:
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module 'codexmini' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """Register the student with the Auto classes (`codexmini.models` does it, in one place, when imported)."""
    try:
        importlib.import_module(".models", __name__)
    except Exception as err:  # noqa: BLE001  (a broken codexmini must not break `import transformers` for everyone)
        warnings.warn(f"codexmini could not register its model with transformers' Auto classes ({err!r}); "
                      "`import codexmini.models` shows the full error", RuntimeWarning, stacklevel=2)


class _RegisterAfterTransformers:
    """A `sys.meta_path` finder that lets the usual finders find transformers, then wraps the found loader's
    `exec_module` so that codexmini registers right after transformers' package module has run.

    It answers only for the name "transformers" and stays installed until that import has actually run: asking
    `importlib.util.find_spec("transformers")` (as accelerate and peft do to probe for it) executes nothing.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as it would without codexmini
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _uninstall_hook()
            _register_with_transformers()

        loader.exec_module = exec_then_register  # this loader was made for this one spec
        return spec


def _is_hook(finder) -> bool:
    return type(finder).__name__ == _RegisterAfterTransformers.__name__  # by name: survives importlib.reload


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_hook(f)]


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(_is_hook(f) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())

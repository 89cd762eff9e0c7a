"""Builds and loads codexmini's own CPU kernels (`csrc/cmx_kernels.cpp`) with torch.utils.cpp_extension.

The first load compiles them for this machine's CPU (`-march=native`: AVX2, AVX-512 VNNI or plain C++;
`CODEXMINI_KERNEL_ARCH` names another target), which takes about a minute and needs a C++ compiler and ninja;
the build is cached under `~/.cache/codexmini/kernels/` (`CODEXMINI_KERNEL_CACHE` moves it), keyed by the
source, the flags and the torch installation, so later loads take milliseconds. Where no compiler is available,
`load()` returns None and says why in `load_error()`, and the runtime falls back to torch's own kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

from ..ops.cpu import bf16_matmul_pays

SOURCE = Path(__file__).parent / "csrc" / "cmx_kernels.cpp"
_state: dict = {}


def _flags() -> list[str]:
    """Compiler flags; `CODEXMINI_KERNEL_ARCH` picks the target CPU instead of this one (e.g. `haswell` for the
    AVX2 path, `x86-64` for plain C++), for a fleet of older devices or to time one path against another."""
    target = os.environ.get("CODEXMINI_KERNEL_ARCH", "native")
    arch = f"-mcpu={target}" if platform.machine().lower() in ("aarch64", "arm64") else f"-march={target}"
    # -fopenmp: at::parallel_for splits rows over torch's threads only when compiled with OpenMP (the libgomp.so.1
    # torch ships is already loaded, so the extension shares torch's thread pool).
    return ["-O3", arch, "-fno-math-errno", "-fopenmp"]


def build_dir() -> Path:
    """Where the compiled kernels for this source, these flags and this torch installation live."""
    root = Path(os.environ.get("CODEXMINI_KERNEL_CACHE", Path.home() / ".cache" / "codexmini" / "kernels"))
    # torch's location too: the build's include and library paths are the environment's, so two environments
    # sharing one folder would rebuild it for each other
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags()).encode() + torch.__version__.encode()
                         + platform.machine().encode() + str(Path(torch.__file__).parent).encode()).hexdigest()[:16]
    return root / key


def load(verbose: bool = False):
    """The compiled kernel module, building it on first use; None (with a warning) where it cannot be built."""
    if "module" in _state:
        return _state["module"]
    module = None
    try:
        from torch.utils.cpp_extension import load as load_extension

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        # compiled from a copy inside the (content-keyed) build folder: ninja keys its build on the source's path,
        # so two checkouts compiling their own copies in place would rebuild each other's cache every time
        source, text = folder / SOURCE.name, SOURCE.read_bytes()
        if not source.is_file() or source.read_bytes() != text:
            tmp = source.with_name(f"{source.name}.{os.getpid()}.tmp")
            tmp.write_bytes(text)
            os.replace(tmp, source)
        module = load_extension(name="codexmini_cmx_kernels", sources=[str(source)], extra_cflags=_flags(),
                                extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=verbose)
        _state["error"] = None
    except Exception as err:  # noqa: BLE001 - any build failure means: use torch's kernels instead
        _state["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        warnings.warn(f"codexmini's CPU kernels could not be built ({_state['error']}); using torch's kernels. "
                      "Install a C++ compiler and `pip install ninja` to get the faster ones.", stacklevel=2)
    if module is not None:  # outside the build's try: a bad CODEXMINI_CPU_BF16 is the user's to fix, not a fallback
        module.set_bf16_prompts(bf16_prompts_pay(module))
    _state["module"] = module
    return module


def bf16_prompts_pay(module) -> bool:
    """Whether prompts' matmuls should run in bf16 with the fast activations: where the kernels' build multiplies
    bf16 natively and torch's bf16 matmul is measurably faster here than its fp32 one on a prompt tile's shape
    (`ops.cpu.bf16_matmul_pays`; `CODEXMINI_CPU_BF16=0|1` decides instead)."""
    return bf16_matmul_pays(128, 576, 256, native=bool(module.bf16_native()))


def load_error() -> str | None:
    """Why `load()` returned None (None when it loaded or was not tried)."""
    return _state.get("error")

"""Atomic file writes and hashing: nothing half-written is ever visible under its final name.

What lands under a final name gets the permissions an ordinary `open(path, "w")` would give (`0o666 & ~umask`,
so 0644 under the usual umask 022), like the files transformers writes itself: `tempfile.mkstemp` makes its
files 0600, and safetensors writes `model.safetensors` 0600 too, which would leave a run's outputs unreadable to
the rest of a team sharing the machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows.

    `os.umask` can only be read by setting it, which for an instant applies the wrong mask to files other threads
    create; Linux shows it in /proc/self/status instead, so that is tried first.
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Umask:"):
                        return int(line.split()[1], 8)
        except (OSError, ValueError):
            pass  # no /proc (a sandbox) or a kernel older than 4.7: fall through to the set-and-restore
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open()` gives a new file: `0o666 & ~umask`."""
    return 0o666 & ~current_umask()


def new_dir_mode() -> int:
    """The mode `mkdir()` gives a new folder: `0o777 & ~umask`."""
    return 0o777 & ~current_umask()


# Free bytes below which a failed write is put down to a full disk: writers that are not Python's own file objects
# report it their own way (torch.save: "unexpected pos 139136 vs 139024"; safetensors: "os error 28").
FULL_DISK_BYTES = 1 << 20
_NO_SPACE = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def no_space_error(err: BaseException, path: str | Path) -> OSError | None:
    """An OSError(ENOSPC) saying "no space left on device while writing <path>" when a failed write of `path` was
    caused by a full disk (or quota), whatever the writer raised; None when the disk is not the cause.

    Call it while the failed write's partial file still exists: a writer's own cryptic error is recognised by the
    free space left on the filesystem then."""
    if isinstance(err, OSError) and err.errno is not None:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)  # the OS said what it was
    else:
        full = any(s in str(err).lower() for s in _NO_SPACE) or _free_bytes(Path(path)) < FULL_DISK_BYTES
    if not full:
        return None
    if isinstance(err, OSError) and str(err.strerror or "").startswith("no space left on device while writing"):
        return err
    return OSError(errno.ENOSPC, f"no space left on device while writing {path}; free some space and try again")


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return FULL_DISK_BYTES


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.

    The file that lands on `path` has mode `0o666 & ~umask`, whatever the writer did to the temporary file
    (mkstemp creates it 0600; a writer that itself writes atomically replaces it with its own mode). A write that
    fails because the disk is full raises OSError(ENOSPC) saying so and naming `path` (see `no_space_error`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except Exception as err:
        full = no_space_error(err, path)  # while the partial temporary file still takes its space
        if full is not None and full is not err:
            raise full from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder inside `folder`; on success everything in it is moved into `folder`.

    For writers that make several files at once (`save_pretrained`): each file replaces its namesake in `folder`
    atomically, so a reader never sees a half-written file, only (for a moment) a mix of old and new files. Moved
    files get mode `0o666 & ~umask` and moved folders `0o777 & ~umask`, like the files of an ordinary
    `save_pretrained`. On failure the temporary folder is removed and `folder` is left as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".staged."))
    try:
        yield tmp
        file_mode, dir_mode = new_file_mode(), new_dir_mode()
        for entry in sorted(tmp.iterdir()):
            _set_modes(entry, file_mode, dir_mode)
            target = folder / entry.name
            if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # os.replace cannot put a folder onto a non-empty one
            os.replace(entry, target)
    except Exception as err:
        full = no_space_error(err, folder)  # while the partial files still take their space
        if full is not None:  # named by the folder: the temporary one inside it is about to go
            raise OSError(errno.ENOSPC, f"no space left on device while writing {folder}; free some space and "
                                        "try again") from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _set_modes(path: Path, file_mode: int, dir_mode: int) -> None:
    if path.is_symlink():
        return
    if path.is_dir():
        os.chmod(path, dir_mode)
        for child in path.iterdir():
            _set_modes(child, file_mode, dir_mode)
    else:
        os.chmod(path, file_mode)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

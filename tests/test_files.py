import os
import stat
import sys

import pytest
from safetensors.torch import save_file

from codexmini.files import atomic_path, current_umask, sha256_file, staged_folder, write_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("platform", ["linux", "darwin"])  # /proc/self/status, or set-and-restore elsewhere
def test_current_umask_reads_without_changing_it(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)


def test_atomic_writes_get_the_usual_permissions(tmp_path, umask_022):
    write_atomic(tmp_path / "manifest.json", "{}")
    assert _mode(tmp_path / "manifest.json") == 0o644
    with atomic_path(tmp_path / "sub" / "blob.bin") as tmp:
        assert _mode(tmp) == 0o600  # mkstemp's private file while it is being written
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "sub" / "blob.bin") == 0o644
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["blob.bin"]


def test_atomic_path_follows_the_umask_not_the_writer(tmp_path):
    import torch

    old = os.umask(0o077)
    try:
        with atomic_path(tmp_path / "private.txt") as tmp:
            tmp.write_text("x")
        assert _mode(tmp_path / "private.txt") == 0o600
    finally:
        os.umask(old)
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)  # safetensors writes its own 0600 file
        assert _mode(tmp_path / "model.safetensors") == 0o644
    finally:
        os.umask(old)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    write_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_staged_folder_moves_files_in_with_the_usual_permissions(tmp_path, umask_022):
    import torch

    out = tmp_path / "stage"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "keep.txt").write_text("untouched")
    with staged_folder(out) as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
        (tmp / "config.json").write_text("new")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.txt").write_text("x")
        os.chmod(tmp / "sub" / "x.txt", 0o600)
        hashes = {p.name: sha256_file(p) for p in tmp.iterdir() if p.is_file()}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt", "model.safetensors", "sub"]
    assert (out / "config.json").read_text() == "new" and (out / "keep.txt").read_text() == "untouched"
    assert hashes["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert _mode(out / "model.safetensors") == _mode(out / "config.json") == _mode(out / "sub" / "x.txt") == 0o644
    assert _mode(out / "sub") == 0o755


def test_staged_folder_leaves_the_folder_alone_on_failure(tmp_path):
    (tmp_path / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("save failed")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "old"

"""Issue 16, item 8: damaged or missing files get errors that name the file and say what to do; a full disk says
"no space left on device" whatever the writer raised; temporaries a kill -9 leaves are cleaned at the next start.
(A damaged manifest: test_manifest_fuzz; a damaged step checkpoint: test_lock; a damaged model.init folder:
test_skips.)"""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

from codexmini import files
from codexmini.files import atomic_path, staged_folder, write_atomic
from codexmini.models.teacher import load_teacher
from codexmini.train.checkpoint import latest_checkpoint, save_checkpoint
from tests.hardening.conftest import TINY, run_cli


@pytest.fixture
def teacher_folder(tiny_llama_dir, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


def test_a_truncated_teacher_is_named_by_validate_and_by_the_loader(teacher_folder, tmp_path, capsys):
    weights = teacher_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert run_cli("validate", "tiny_smoke", "teacher=hf", f"teacher.spec={teacher_folder}") == 1
    out = capsys.readouterr().out
    assert f"teacher.spec: {weights} is truncated or damaged" in out and "save the teacher again" in out
    with pytest.raises(ValueError, match=f"{weights} is truncated or damaged.*download or save it again"):
        load_teacher(str(teacher_folder))


def test_a_teacher_with_a_damaged_config_is_named(teacher_folder, capsys):
    (teacher_folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ValueError, match="config.json"):
        load_teacher(str(teacher_folder))
    assert run_cli("validate", "tiny_smoke", "teacher=hf", f"teacher.spec={teacher_folder}",
                   "model.layers=[0, 1]", "model.layer_types=[softmax, linear]") == 1
    assert "config.json" in capsys.readouterr().out


def _full_disk(monkeypatch):
    """The filesystem reports no free space (what a full disk shows while a failed write's file still exists)."""
    monkeypatch.setattr(files, "_free_bytes", lambda path: 0)


def test_atomic_writes_say_no_space_left(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"

    def enospc(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"no space left on device while writing {target}") as err:
        with atomic_path(target) as tmp:
            enospc(tmp)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(type(target), "write_text", lambda self, text: enospc())
    with pytest.raises(OSError, match=f"no space left on device while writing {target}"):
        write_atomic(target, "x")
    # torch.save's own words for it, with the filesystem full.
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="no space left on device") as err:
        with atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(OSError, match=f"no space left on device while writing {tmp_path / 'stage'}"):
        with staged_folder(tmp_path / "stage"):
            raise RuntimeError("Error while serializing: I/O error")


def test_other_failures_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with atomic_path(tmp_path / "x"):
            raise RuntimeError("unexpected pos 576 vs 534")  # plenty of space: not the disk
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "y"):
            raise PermissionError(errno.EACCES, "denied")


def test_a_checkpoint_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path / "ckpt", 5, model, opt, sched)

    def torch_save_on_full_disk(*_, **__):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 139136 vs 139024")

    monkeypatch.setattr(torch, "save", torch_save_on_full_disk)
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="no space left on device while writing the step 10 checkpoint"):
        save_checkpoint(tmp_path / "ckpt", 10, model, opt, sched)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_5"]
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_5"


def test_a_run_on_a_full_disk_ends_with_one_clear_line(tmp_path, monkeypatch, capsys):
    from codexmini import CodexMiniForCausalLM

    def save_pretrained(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CodexMiniForCausalLM, "save_pretrained", save_pretrained)
    assert run_cli("run", "tiny_smoke", f"output_dir={tmp_path / 'runs'}", *TINY) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "run the same command again" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("codexmini: error: no space left")


def test_stale_temporaries_are_cleaned_at_start(tiny_run, capsys):
    out, run_dir = tiny_run
    stage = run_dir / "01-distill"
    litter = [run_dir / ".config.yaml.k3j2.tmp", stage / ".model.safetensors.x1y2.tmp", stage / ".save.abc",
              run_dir / "00-init" / ".staged.q9", stage / "checkpoints" / ".step_3.tmp"]
    for p in litter:
        if p.name.startswith((".staged.", ".step_")):
            p.mkdir(parents=True)
            (p / "model.safetensors").write_bytes(b"\0" * 200_000)
        else:
            p.write_bytes(b"\0" * 200_000)
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY) == 0
    assert "01-distill: complete, skipped" in capsys.readouterr().out  # cleaning does not redo finished work
    assert [p for p in litter if p.exists()] == []


def test_garbage_in_the_bookkeeping_files_is_not_a_traceback(tiny_run, capsys):
    out, run_dir = tiny_run
    (run_dir / "01-distill" / "manifest.json").unlink()  # an interrupted stage ...
    (run_dir / "01-distill" / "stage_key").write_bytes(b"\xff\xfe\x00garbage")  # ... with a damaged marker
    (run_dir / ".lock").write_bytes(b"\xff\xfe not utf-8")
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY) == 0
    assert "01-distill: running distill" in capsys.readouterr().out

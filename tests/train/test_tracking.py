import json

import pytest

from codexmini.train import TrackerUnavailable, check_trainer_config, fit, next_token_loss, tracker_names
from codexmini.train import tracking
from tests.train.conftest import tiny_model, trainer


def test_tensorboard_writes_event_files_beside_metrics_jsonl(blocks, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tiny_model(), next_token_loss, blocks, blocks[:2], trainer(max_steps=6, log_every=2, eval_every=3,
                                                                   log_with="tensorboard"), workdir=tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 3, 4, 6] and "val_ppl" in logged[1] and "val_ppl" not in logged[0]
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 3, 4, 6]
    assert [e.step for e in acc.Scalars("val_ppl")] == [3, 6]
    assert acc.Scalars("loss")[-1].value == pytest.approx(logged[-1]["loss"])


def test_log_with_none_writes_metrics_jsonl_only(blocks, tmp_path):
    fit(tiny_model(), next_token_loss, blocks, None, trainer(max_steps=2, log_with="none"), workdir=tmp_path)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tensorboard").exists()


def test_unknown_tracker_is_refused_naming_the_key(blocks, tmp_path):
    assert {"tensorboard", "wandb", "mlflow", "none"} <= set(tracker_names()) and "all" not in tracker_names()
    with pytest.raises(ValueError, match=r"trainer.log_with 'tensorbored' is not one of .*tensorboard"):
        check_trainer_config(trainer(log_with="tensorbored"))
    with pytest.raises(ValueError, match="trainer.log_with"):
        fit(tiny_model(), next_token_loss, blocks, None, trainer(log_with="tensorbored"), workdir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran


def test_missing_tracker_package_names_what_to_install(monkeypatch, blocks, tmp_path):
    monkeypatch.setattr(tracking, "tracker_installed", lambda name: False)
    with pytest.raises(TrackerUnavailable, match="pip install comet-ml") as err:
        check_trainer_config(trainer(log_with="comet_ml"))
    assert isinstance(err.value, ImportError) and isinstance(err.value, ValueError)
    with pytest.raises(TrackerUnavailable, match="trainer.log_with=mlflow needs the mlflow package"):
        fit(tiny_model(), next_token_loss, blocks, None, trainer(log_with="mlflow"), workdir=tmp_path)
    # The default tracker is an optional extra: without it a run still trains and writes metrics.jsonl.
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        fit(tiny_model(), next_token_loss, blocks, None, trainer(max_steps=2, log_with="tensorboard"),
            workdir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()

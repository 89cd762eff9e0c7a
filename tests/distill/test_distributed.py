import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from codexmini import CodexMiniForCausalLM
from codexmini.distill import DistillConfig, distill
from codexmini.train import TrainerConfig
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_two_real_processes_split_the_batches(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "tests" / "distill" / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    assert ranks[0]["checksum"] != ranks[1]["checksum"]  # each process saw its own blocks
    # DDP keeps the replicas identical.
    assert ranks[0]["first_param"] == ranks[1]["first_param"]
    # Together they saw exactly what one process sees for the same global batches.
    torch.manual_seed(0)
    blocks = torch.randint(4, 300, (16, 16), generator=torch.Generator().manual_seed(0))
    teacher = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "softmax"])).eval()
    _, single = distill(CodexMiniForCausalLM(tiny_config()), teacher, blocks, blocks[:2], DistillConfig(),
                        TrainerConfig(max_steps=3, batch_size=4, eval_every=100, checkpoint_every=100,
                                      mixed_precision="no"))
    assert ranks[0]["checksum"] + ranks[1]["checksum"] == single["data_checksum"]

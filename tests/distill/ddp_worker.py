"""Run by test_two_processes under torchrun: a 3-step distillation on 2 CPU processes (gloo)."""

import json
import sys

import torch

from codexmini import CodexMiniForCausalLM
from codexmini.distill import DistillConfig, distill
from codexmini.train import TrainerConfig
from tests.conftest import tiny_config

out = sys.argv[1]
torch.manual_seed(0)
blocks = torch.randint(4, 300, (16, 16), generator=torch.Generator().manual_seed(0))
teacher = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "softmax"])).eval()
student = CodexMiniForCausalLM(tiny_config())
trainer = TrainerConfig(max_steps=3, batch_size=4, eval_every=100, checkpoint_every=100, mixed_precision="no")
_, metrics = distill(student, teacher, blocks, blocks[:2], DistillConfig(), trainer)
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
with open(f"{out}/rank{metrics['rank']}.json", "w") as f:
    json.dump({"world_size": metrics["world_size"], "checksum": metrics["data_checksum"], "backend": backend,
               "first_param": float(next(student.parameters()).flatten()[0])}, f)

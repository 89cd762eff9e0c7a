"""Hidden-state matching: student layer outputs pulled towards the teacher's, through a learned projection when
the widths differ (a student pruned in hidden size, or built narrower).

Hidden states follow the transformers convention: `hidden_states[0]` is the embedding output, `hidden_states[i+1]`
the output of layer i (the last one after the final norm). Student layer i is matched to teacher layer
`teacher_layers[i]`.

Losses, per matched layer, averaged over layers and tokens:
- mse: ||P h_s - h_t||^2 / mean(h_t^2): normalised by the teacher's mean square, so layers with large
  activations (Llama's "massive activations") do not drown the others.
- cosine: 1 - cos(P h_s, h_t).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_LOSSES = ("mse", "cosine")


def layer_map(student_config, teacher_config, student_layers: Sequence[int] | None = None,
              teacher_layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer) to match.

    Defaults: every student layer; teacher layers from the student's `source_layers` (the layers it was copied
    from), else evenly spaced so the last student layer meets the last teacher layer.
    """
    n_s, n_t = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    s_layers = list(range(n_s)) if student_layers is None else [int(i) for i in student_layers]
    bad = [i for i in s_layers if not 0 <= i < n_s]
    if bad:
        raise ValueError(f"distill.hidden_student_layers {bad} are outside the student's {n_s} layers")
    if teacher_layers is None:
        source = getattr(student_config, "source_layers", None)
        if source is not None and max(source) < n_t:
            t_layers = [int(source[i]) for i in s_layers]
        else:
            t_layers = [round((i + 1) * n_t / n_s) - 1 for i in s_layers]
    else:
        t_layers = [int(i) for i in teacher_layers]
        if len(t_layers) != len(s_layers):
            raise ValueError(f"distill.hidden_teacher_layers has {len(t_layers)} entries but "
                             f"{len(s_layers)} student layers are matched; give one teacher layer per student layer")
    bad = [i for i in t_layers if not 0 <= i < n_t]
    if bad:
        raise ValueError(f"distill.hidden_teacher_layers {bad} are outside the teacher's {n_t} layers")
    return list(zip(s_layers, t_layers))


class HiddenProjector(nn.Module):
    """One linear map per matched layer from the student's width to the teacher's (identity when equal)."""

    def __init__(self, n_layers: int, student_width: int, teacher_width: int):
        super().__init__()
        self.identity = student_width == teacher_width
        self.proj = nn.ModuleList() if self.identity else nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_layers))
        for p in self.proj:
            # Start as a (scaled) partial identity so training begins from "copy the shared dimensions".
            nn.init.zeros_(p.weight)
            k = min(student_width, teacher_width)
            with torch.no_grad():
                p.weight[:k, :k] = torch.eye(k)

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h if self.identity else self.proj[i](h)


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      pairs: Sequence[tuple[int, int]], projector: HiddenProjector, kind: str = "mse",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean matching loss over `pairs` (student layer, teacher layer); `mask` `[B, T]` selects tokens."""
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"distill.hidden_loss {kind!r} is not one of {HIDDEN_LOSSES}")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for j, (s, t) in enumerate(pairs):
        hs = projector(j, student_hidden[s + 1]).float()
        ht = teacher_hidden[t + 1].float()
        if kind == "mse":
            per_tok = (hs - ht).pow(2).mean(-1) / ht.pow(2).mean().clamp(min=1e-8)
        else:
            per_tok = 1 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-6)
        if mask is not None:
            total = total + (per_tok * mask).sum() / mask.sum().clamp(min=1)
        else:
            total = total + per_tok.mean()
    return total / max(len(pairs), 1)

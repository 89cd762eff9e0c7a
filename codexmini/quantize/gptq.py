"""GPTQ (Frantar et al. 2022): quantize a linear layer's weight column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's calibration inputs.

The output uses the same grids and packed layout as round-to-nearest (`codexmini.ops.layouts`), so everything downstream (the
quantized module, the export, the runtime) is shared; only the integer codes differ.
"""

from __future__ import annotations

import torch

from ..ops.layouts import GroupWeight, check_group_size, from_codes, grid, group_weight, search_grid, to_codes


class HessianAccumulator:
    """H = 2/n * sum x x^T over the rows of a layer's inputs, accumulated batch by batch."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.H += 2 * x.t() @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return (self.H / max(self.n, 1)).float()


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool | str = True, damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                  search: bool = False):
    """GPTQ on `weight [out, in]` with Hessian `H [in, in]`.

    Returns int8 `(codes, scale)` or a `GroupWeight` (bits 4 / 3 / 2), exactly like `quantize_rtn`; `symmetric`
    is the group grid's kind (`codexmini.ops.layouts.mode_of`: True, False, "sym", "asym" or "min").
    With `search`, each group's grid is `search_grid`'s, its errors weighted by the Hessian's diagonal (the mean
    squared input of each column: the importance matrix), instead of the round-to-nearest range.
    With `act_order`, columns are processed by decreasing Hessian diagonal, and group scales are fixed from the
    original weights beforehand ("static groups") so the stored layout keeps contiguous groups.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if bits != 8:
        check_group_size(cols, group_size, bits=bits)
    g = group_size if bits != 8 else cols
    H = H.clone().float()
    importance = torch.diag(H).clone()

    def group_grid(values, first_col):
        if search and bits != 8:
            return search_grid(values, bits, symmetric, importance[first_col:first_col + g])
        return grid(values, bits, symmetric)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    # Group parameters: fixed up front with act_order (static groups); otherwise from the error-updated weights
    # when each group starts, as in the reference algorithm.
    n_groups = cols // g
    scale = torch.zeros(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    if act_order or bits == 8:
        for j in range(n_groups):
            scale[:, j], zero[:, j] = group_grid(W[:, j * g:(j + 1) * g], j * g)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"GPTQ: the calibration Hessian is not positive definite even with damp={damp}; raise "
                         "quantize.damp or use more calibration blocks") from err
    codes = torch.zeros(rows, cols)
    bs = block_size if act_order or block_size % g == 0 else g * max(block_size // g, 1)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not act_order and bits != 8 and col % g == 0:
                scale[:, grp], zero[:, grp] = group_grid(W1[:, i:i + g], col)
            w = W1[:, i]
            c = to_codes(w, scale[:, grp], zero[:, grp], bits, symmetric)
            q = from_codes(c, scale[:, grp], zero[:, grp], bits, symmetric)
            codes[:, col] = c
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if bits == 8:
        return codes.to(torch.int8), scale[:, 0].half()
    return group_weight(codes, scale, zero, g, bits, symmetric)

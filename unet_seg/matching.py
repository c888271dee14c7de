"""Bipartite matching for set-prediction losses (Mask2Former-style mask classification).

    cols = min_cost_assignment(cost, rows)        # cost [N, T targets, Q queries], T <= Q
    loss on pairs (t, cols[n, t]) where rows[n, t] # every target gets its own query

The shortest-augmenting-path Hungarian algorithm (Kuhn–Munkres with potentials, Jonker–Volgenant
style), exact: in each of the N matrices the marked rows get distinct columns of minimum total
cost. It runs on the tensors' device, all N matrices at once, in a fixed number of tensor
operations (≈ T² of them) with no host sync and no data-dependent Python control flow, so a
training step that matches can be replayed as one CUDA graph. Unmarked rows (a class absent
from an image) take no column, as if they were not in the matrix.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .models.layers import capturing


def min_cost_assignment(cost: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """cost [N, T, Q] (finite, T <= Q), rows [N, T] bool (None: all) -> cols [N, T] long: in each
    matrix the marked rows get distinct columns minimising Σ cost[n, t, cols[n, t]]; -1 for the
    unmarked. Bookkeeping outside autograd (float64 inside); no host sync."""
    if cost.ndim != 3:
        raise ValueError(f"cost must be matrices [N, T, Q], got shape {tuple(cost.shape)}")
    n, t, q = cost.shape
    if t > q:
        raise ValueError(f"cost must have no more rows than columns (T <= Q), got T = {t}, Q = {q}")
    rows = torch.ones(n, t, dtype=torch.bool, device=cost.device) if rows is None else rows.to(cost.device)
    if rows.shape != (n, t) or rows.dtype != torch.bool:
        raise ValueError(f"rows must be bool [{n}, {t}], got {rows.dtype} {tuple(rows.shape)}")
    if not capturing(cost) and not torch.isfinite(cost).all():
        raise ValueError("cost must be finite (mask infeasible pairs with a large finite value)")
    c = torch.nn.functional.pad(cost.detach().double(), (1, 0, 1, 0))  # [N, T+1, Q+1]: row and column 0 are virtual
    # owner[:, j] = row (1-based) holding column j, 0: free; way[:, j] = the column before j on the shortest path to it
    u, v = c.new_zeros(n, t + 1), c.new_zeros(n, q + 1)  # potentials of rows and columns
    owner = torch.zeros(n, q + 1, dtype=torch.long, device=c.device)
    way = torch.zeros_like(owner)
    for i in range(1, t + 1):
        active = rows[:, i - 1].clone()  # matrices still growing row i's shortest-path tree
        owner[:, 0] = i
        j0 = torch.zeros(n, 1, dtype=torch.long, device=c.device)
        minv = c.new_full((n, q + 1), float("inf"))  # -inf once a column joins the tree: never "better", unchanged by -= delta
        used = torch.zeros(n, q + 1, dtype=torch.bool, device=c.device)
        for _ in range(i):  # each pass adds one column to the tree; at most i - 1 columns are held, so a free one comes by pass i
            used.scatter_(1, j0, True)  # (a finished matrix marks its free column again: its delta is 0 from here on)
            minv.scatter_(1, j0, float("-inf"))
            i0 = owner.gather(1, j0)  # [N, 1], the row holding j0
            reduced = c.gather(1, i0[:, :, None].expand(-1, 1, q + 1))[:, 0] - u.gather(1, i0) - v
            better = (reduced < minv) & active[:, None]
            minv = torch.where(better, reduced, minv)
            way = torch.where(better, j0, way)
            j1 = minv.masked_fill(used, float("inf")).argmin(1, keepdim=True)  # first of equal minima, as a sequential scan
            delta = torch.where(active[:, None], minv.gather(1, j1), 0)
            held = torch.where(used, delta, 0)
            u.scatter_add_(1, owner, held)  # the tree's rows: owners of its columns (column 0's is row i)
            v -= held
            minv -= delta
            j0 = torch.where(active[:, None], j1, j0)
            active &= owner.gather(1, j0)[:, 0] != 0
        for _ in range(i):  # augment back along the path (at most i columns) to the virtual column, whose way is 0
            j1 = way.gather(1, j0)
            owner.scatter_(1, j0, owner.gather(1, j1))
            j0 = j1
    cols = torch.full((n, t + 1), -1, dtype=torch.long, device=c.device)
    cols = cols.scatter(1, owner[:, 1:], torch.arange(q, device=c.device).expand(n, q))  # free columns all land on index 0
    return cols[:, 1:]

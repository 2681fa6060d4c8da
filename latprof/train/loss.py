"""Latency-sparsity loss: the table's predicted latency of the current soft keep decisions, penalised
above the budget, plus a ratio term pulling each stage's kept share toward the solver's targets.

    expected kept_s = mean over the batch of sum_i p_keep(i) * alive(i)    (soft, differentiable)
    latency        = sum over units of interp(table, N_unit(expected kept))  (piecewise linear, torch)
    loss           = relu(latency - budget) / budget + mean_s mean_b (share_{s,b} - target_s)^2

The ratio term is per sample (as in DynamicViT/SPViT), so every image is pushed toward the target
schedule; the latency term acts on the batch mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latprof.train.latency import LatencyModel


@dataclass
class LatencyTerms:
    loss: torch.Tensor
    latency_ms: torch.Tensor   # predicted latency of the expected (soft) schedule, a scalar tensor
    shares: torch.Tensor       # [stages] batch-mean kept share per stage (soft)


class LatencySparsityLoss(torch.nn.Module):
    def __init__(self, lm: LatencyModel, budget_ms: float, target_kept, latency_only: bool = False):
        super().__init__()
        self.lm = lm
        self.budget = float(budget_ms)
        self.predict = lm.torch_predictor()
        # what a kept count is a share of, per stage (DeiT: the patches; PiT/Swin: see LatencyModel.from_staged)
        self.whole = list(lm.whole or [lm.patches] * len(target_kept))
        self.windows = list(lm.windows or [1] * len(target_kept))
        self.register_buffer("targets", torch.tensor([k / w for k, w in zip(target_kept, self.whole)], dtype=torch.float32))
        self.latency_only = latency_only

    def forward(self, keep_prob: list) -> LatencyTerms:
        """keep_prob: per stage [B, P] soft keep probabilities (0 for dead tokens), from SPViTOutput."""
        # [S, B] expected kept per sample (Swin: per window, decisions being per token of the grid)
        kept = torch.stack([p.float().sum(1) / w for p, w in zip(keep_prob, self.windows)])
        if self.predict.curves and self.predict.curves[0][1].device != kept.device:  # (stage, xs, ys, offset)
            self.predict = self.lm.torch_predictor(device=kept.device)
        latency = self.predict(list(kept.mean(1)))
        loss = F.relu(latency - self.budget) / self.budget
        shares = kept / torch.tensor(self.whole, dtype=kept.dtype, device=kept.device)[:, None]
        if not self.latency_only:
            loss = loss + ((shares - self.targets.to(shares.device)[:, None]) ** 2).mean()
        return LatencyTerms(loss, latency.detach(), shares.mean(1).detach())

"""SPViT for PiT (hierarchical, `latprof.models.staged`'s definition): token selectors at per-stage
pruning locations, package tokens that live until the end of their stage, pruned tokens that bypass the
rest of their stage and are back in the grid at the pooling.

Modes as in `latprof.train.spvit`: ``gumbel`` (training), ``threshold``, ``topk-mask`` (static counts,
masking) and ``topk`` (static counts, tokens really removed; what is deployed). Masking and removal
compute the same thing for the same kept set: a pruned token is a dead key in attention and its own
value is carried past the block unchanged, exactly what removing it and writing it back does.

Not yet here: Swin (per-window decisions), and the wiring into `latprof train`.
"""

from __future__ import annotations

import torch
from torch import nn

from latprof.train import pruning
from latprof.train.spvit import MODES, SPViTOutput, masked_block


class StagedSPViT(nn.Module):
    def __init__(self, pit: nn.Module, layout, kept=None, tau: float = 1.0):
        super().__init__()
        if layout.family != "pit":
            raise ValueError(f"StagedSPViT covers PiT so far, not {layout.family}")
        self.pit, self.layout, self.tau = pit, layout, tau
        self.kept = tuple(kept) if kept is not None else None
        self.selectors = nn.ModuleList(
            pruning.TokenSelector(layout.stages[layout.location_stage(s)].dim, layout.stages[layout.location_stage(s)].heads)
            for s in range(len(layout.locations)))

    def forward(self, images: torch.Tensor, mode: str | None = None, kept=None) -> SPViTOutput:
        mode = mode or ("gumbel" if self.training else ("topk" if self.kept is not None else "threshold"))
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        kept = tuple(kept) if kept is not None else self.kept
        if mode.startswith("topk") and kept is None:
            raise ValueError("top-k modes need kept counts per location")
        m = self.pit
        x = m.patch_embed(images) + m.pos_embed
        cls = m.cls_token.expand(x.shape[0], -1, -1)
        probs, keeps = [], []
        for st, stage in enumerate(self.layout.stages):
            tr = m.transformers[st]
            if st:
                x, cls = tr.pool(x, cls)
            B, C, H, W = x.shape
            tokens = torch.cat((cls, x.flatten(2).transpose(1, 2)), dim=1)
            run = self._stage_removal if mode == "topk" else self._stage_masked
            tokens = run(st, stage, tr, tokens, mode, kept, probs, keeps)
            cls = tokens[:, :1]
            x = tokens[:, 1:1 + stage.patches].transpose(1, 2).reshape(B, C, H, W)  # package tokens end here
        return SPViTOutput(m.head(m.norm(cls)[:, 0]), probs, keeps)

    def _stage_masked(self, st, stage, tr, tokens, mode, kept, probs, keeps):
        B, P = tokens.shape[0], stage.patches
        policy, bias = None, None
        for b, blk in zip(stage.blocks, tr.blocks):
            if b in self.layout.locations:
                s = self.layout.locations.index(b)
                if policy is None:
                    policy = tokens.new_ones(B, tokens.shape[1])
                scores = self.selectors[s](tokens, policy)[:, 1:1 + P]
                alive = policy[:, 1:1 + P]
                if mode == "gumbel":
                    keep = pruning.gumbel_keep(scores, alive, self.tau)
                elif mode == "threshold":
                    keep = pruning.threshold_keep(scores, alive)
                else:
                    keep = pruning.topk_keep(scores, alive, kept[s])
                pkg = pruning.package_token(tokens[:, 1:1 + P], scores, alive - keep)
                tokens = torch.cat([tokens, pkg], dim=1)
                policy = torch.cat([policy[:, :1], keep, policy[:, 1 + P:], policy.new_ones(B, 1)], dim=1)
                probs.append(scores[..., 0].exp() * alive)
                keeps.append(keep)
                bias = pruning.attention_bias(policy)
            if policy is None:
                tokens = blk(tokens)
            else:  # a pruned token is a dead key and bypasses the block (it keeps its value for the pooling)
                tokens = tokens + policy[..., None] * (masked_block(blk, tokens, bias) - tokens)
        return tokens

    def _stage_removal(self, st, stage, tr, tokens, mode, kept, probs, keeps):
        grid = tokens[:, 1:]                   # every patch token, pruned ones with their value at pruning
        active, n_active, packages = None, stage.patches, []
        for b, blk in zip(stage.blocks, tr.blocks):
            if b in self.layout.locations:
                s = self.layout.locations.index(b)
                ones = tokens.new_ones(tokens.shape[0], tokens.shape[1])
                scores = self.selectors[s](tokens, ones)[:, 1:1 + n_active]
                patches = tokens[:, 1:1 + n_active]
                idx = pruning.topk_indices(scores, None, kept[s])              # [B, k]
                dropped = ones[:, 1:1 + n_active].scatter(1, idx, 0.0)
                pos = idx if active is None else active.gather(1, idx)          # grid positions kept
                grid = patches if active is None else _put(grid, active, patches)
                active, n_active = pos, kept[s]
                packages.append(pruning.package_token(patches, scores, dropped))
                kept_tokens = patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))
                tokens = torch.cat([tokens[:, :1], kept_tokens, *packages], dim=1)
                probs.append(scores[..., 0].exp())
            tokens = blk(tokens)
        if active is not None:
            grid = _put(grid, active, tokens[:, 1:1 + n_active])
            tokens = torch.cat([tokens[:, :1], grid], dim=1)
        return tokens


def _put(grid: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """grid[b, idx[b]] = src[b] (a copy)."""
    return grid.scatter(1, idx[..., None].expand(-1, -1, grid.shape[-1]), src)

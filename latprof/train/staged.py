"""SPViT for hierarchical ViTs (`latprof.models.staged`'s definitions), with token selectors at per-stage
pruning locations:
- PiT: package tokens that live until the end of their stage; pruned tokens bypass the rest of their
  stage and are back in the grid at the pooling.
- Swin: the selector scores the stage's grid once per location; in every later block of the stage each
  window processes its tokens that are kept (training: a Gumbel decision per token; static: that block's
  window's top-k by score, shifted windows choosing their own); the others bypass the block.

Modes as in `latprof.train.spvit`: ``gumbel`` (training), ``threshold``, ``topk-mask`` (static counts,
masking) and ``topk`` (static counts, tokens really removed; what is deployed). Masking and removal
compute the same thing for the same kept set: a pruned token is a dead key in attention and its own
value is carried past the block unchanged, exactly what removing it and writing it back does.

`latprof train` and `latprof export` use it for these models.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from latprof.models.swin_nn import window_block, window_topk_block
from latprof.train import pruning
from latprof.train.spvit import SPViTOutput, masked_block, masked_prune, resolve_mode


class StagedSPViT(nn.Module):
    def __init__(self, backbone: nn.Module, layout, kept=None, tau: float = 1.0):
        super().__init__()
        self.backbone, self.layout, self.tau = backbone, layout, tau
        self.kept = tuple(kept) if kept is not None else None
        self.selectors = nn.ModuleList(
            pruning.TokenSelector(layout.stages[layout.location_stage(s)].dim, layout.stages[layout.location_stage(s)].heads)
            for s in range(len(layout.locations)))

    def backbone_parameters(self):
        return self.backbone.parameters()

    def selector_parameters(self):
        return self.selectors.parameters()

    def forward(self, images: torch.Tensor, mode: str | None = None, kept=None) -> SPViTOutput:
        mode, kept = resolve_mode(self, mode, kept)
        if self.layout.family == "swin":
            return self._forward_swin(images, mode, kept)
        m = self.backbone
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
                tokens, policy, prob, keep = masked_prune(self.selectors[s], tokens, policy, P, mode, self.tau,
                                                          kept[s] if kept else None)
                probs.append(prob)
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


    # -- Swin ------------------------------------------------------------------------------------------
    def _forward_swin(self, images, mode, kept):
        m, lay = self.backbone, self.layout
        x = m.patch_embed(images)                                       # [B, H, W, C]
        probs, keeps = [], []
        for st, stage in enumerate(lay.stages):
            layer = m.layers[st]
            x = layer.downsample(x)
            odds, keep, k = None, None, None
            for b, blk in zip(stage.blocks, layer.blocks):
                if b in lay.locations:
                    s = lay.locations.index(b)
                    B, H, W, C = x.shape
                    ones = x.new_ones(B, H * W)
                    scores = self.selectors[s](x.reshape(B, H * W, C), ones)
                    odds = (scores[..., 0] - scores[..., 1]).reshape(B, H, W, 1)
                    k = kept[s] if kept is not None else None
                    if mode in ("gumbel", "threshold"):  # per token; top-k is per window, in each block
                        keep = pruning.keep_decision(mode, scores, ones, self.tau).reshape(B, H, W, 1)
                    probs.append(scores[..., 0].exp())
                    if keep is not None:
                        keeps.append(keep.reshape(B, -1))
                if odds is None:
                    x = blk(x)
                elif mode == "topk":
                    x = _window_removal(blk, x, odds, k)
                else:
                    policy = keep if keep is not None else _window_topk(blk, odds, k)
                    x = _window_masked(blk, x, policy)
        return SPViTOutput(m.forward_head(m.norm(x)), probs, keeps)


def _windows(blk, t):
    """[B, H, W, C] -> [B * windows, 49, C] in this block's (shifted) windows."""
    shift = blk.shift_size
    if any(shift):
        t = torch.roll(t, (-shift[0], -shift[1]), (1, 2))
    return window_partition(t, blk.window_size).reshape(-1, blk.window_area, t.shape[-1])


def _grid(blk, w, H, W):
    """The inverse of `_windows`."""
    t = window_reverse(w.reshape(-1, *blk.window_size, w.shape[-1]), blk.window_size, H, W)
    return torch.roll(t, blk.shift_size, (1, 2)) if any(blk.shift_size) else t


def _shift_mask(blk, batch):
    """timm's shift mask [windows, 49, 49] per image of the batch: [B * windows, 1, 49, 49] (or None)."""
    return None if blk.attn_mask is None else blk.attn_mask.repeat(batch, 1, 1)[:, None]


def _window_topk(blk, odds, k):
    """A static policy [B, H, W, 1]: in each of this block's windows, its k best tokens."""
    B, H, W, _ = odds.shape
    so = _windows(blk, odds)[..., 0]
    pw = torch.zeros_like(so).scatter(1, so.topk(k, dim=1).indices, 1.0)
    return _grid(blk, pw[..., None], H, W)


def _window_masked(blk, x, policy):
    """The block with dead keys masked in every window; a dead token bypasses it."""
    B, H, W, C = x.shape
    w, pw = _windows(blk, x), _windows(blk, policy)[..., 0]
    bias = blk.attn._get_rel_pos_bias() + pruning.attention_bias(pw)   # [B*windows, heads, 49, 49]
    y = window_block(blk, w, bias, _shift_mask(blk, B))
    return _grid(blk, w + pw[..., None] * (y - w), H, W)


def _window_removal(blk, x, odds, k):
    """The block on each window's k best tokens only (`swin_nn.window_topk_block`), written back in place."""
    B, H, W, C = x.shape
    area = blk.window_area
    mask = _shift_mask(blk, B)
    w = window_topk_block(blk, _windows(blk, x), _windows(blk, odds)[..., 0], k,
                          blk.attn._get_rel_pos_bias()[0].reshape(-1, area * area),
                          None if mask is None else mask.reshape(-1, area * area))
    return _grid(blk, w, H, W)


def _put(grid: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """grid[b, idx[b]] = src[b] (a copy)."""
    return grid.scatter(1, idx[..., None].expand(-1, -1, grid.shape[-1]), src)

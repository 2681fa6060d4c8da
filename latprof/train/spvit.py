"""SPViT on a timm VisionTransformer: token selectors before the pruning locations, one package token
per stage, attention masking in training and real token removal at inference.

The timm model is held, not modified: its blocks run unchanged when no token is masked (stage 0 and
the removal path), and `masked_block` calls the same submodules with masked attention when tokens
are masked. Forward returns everything it decided (`SPViTOutput`); nothing is stored on the module.

Modes of `SPViT.forward`:
- ``gumbel``: training; hard straight-through Gumbel-softmax decisions, masking.
- ``threshold``: deterministic, data-dependent count (keep where p(keep) > p(drop)), masking.
- ``topk-mask``: deterministic top-k with the static counts ``kept``, masking.
- ``topk``: the deployed model: the same top-k decisions, pruned tokens really removed (static shapes).
Default: ``gumbel`` in training; ``topk`` in eval when ``kept`` is set, else ``threshold``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from latprof.train import pruning

MODES = ("gumbel", "threshold", "topk-mask", "topk")


def resolve_mode(model: nn.Module, mode: str | None, kept):
    """The forward mode and kept counts a call means: Gumbel while training, else top-k when the model
    was given kept counts, else thresholding; an explicit `kept` overrides the model's."""
    mode = mode or ("gumbel" if model.training else ("topk" if model.kept is not None else "threshold"))
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    kept = tuple(kept) if kept is not None else model.kept
    if mode.startswith("topk") and kept is None:
        raise ValueError("top-k modes need kept counts per pruning location")
    return mode, kept


class SPViTOutput(NamedTuple):
    logits: torch.Tensor
    keep_prob: list      # per stage [B, P]: soft expected keep of each patch token (0 for dead ones)
    policy: list         # per stage [B, P]: hard keep decision (0/1); empty in ``topk`` mode


class SPViT(nn.Module):
    def __init__(self, vit: nn.Module, locations=(3, 6, 9), kept=None, tau: float = 1.0):
        super().__init__()
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "global_pool", "token") != "token":
            raise ValueError("SPViT needs a ViT with exactly one class token and class-token pooling")
        depth = len(vit.blocks)
        locations = tuple(int(v) for v in locations)
        if list(locations) != sorted(set(locations)) or not locations or locations[0] < 1 or locations[-1] >= depth:
            raise ValueError(f"pruning locations {list(locations)} must be increasing block indices in 1..{depth - 1}")
        self.vit = vit
        self.locations = locations
        self.patches = int(vit.patch_embed.num_patches)
        heads = vit.blocks[0].attn.num_heads
        self.selectors = nn.ModuleList(pruning.TokenSelector(vit.embed_dim, heads) for _ in locations)
        self.kept = tuple(int(k) for k in kept) if kept is not None else None
        self.tau = tau

    def backbone_parameters(self):
        return self.vit.parameters()

    def selector_parameters(self):
        return self.selectors.parameters()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v._pos_embed(v.patch_embed(images))
        return v.norm_pre(v.patch_drop(x))

    def forward(self, images: torch.Tensor, mode: str | None = None, kept=None) -> SPViTOutput:
        mode, kept = resolve_mode(self, mode, kept)
        x = self.embed(images)
        if mode == "topk":
            return self._forward_removal(x, kept)
        return self._forward_masked(x, mode, kept)

    def _forward_masked(self, x, mode, kept):
        B, P = x.shape[0], self.patches
        policy = x.new_ones(B, x.shape[1])
        probs, keeps, stage = [], [], 0
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.locations) and i == self.locations[stage]:
                x, policy, prob, keep = masked_prune(self.selectors[stage], x, policy, P, mode, self.tau,
                                                     kept[stage] if kept else None)
                probs.append(prob)
                keeps.append(keep)
                stage += 1
                bias = pruning.attention_bias(policy)   # once per stage: its blocks share one policy
            x = blk(x) if stage == 0 else masked_block(blk, x, bias)
        return SPViTOutput(self._head(x), probs, keeps)

    def _forward_removal(self, x, kept):
        probs, n_patch, stage = [], self.patches, 0
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.locations) and i == self.locations[stage]:
                ones = x.new_ones(x.shape[0], x.shape[1])
                scores = self.selectors[stage](x, ones)[:, 1:1 + n_patch]
                patches = x[:, 1:1 + n_patch]
                idx = pruning.topk_indices(scores, None, kept[stage])
                kept_tokens = patches.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                dropped = ones[:, 1:1 + n_patch].scatter(1, idx, 0.0)
                pkg = pruning.package_token(patches, scores, dropped)
                x = torch.cat([x[:, :1], kept_tokens, x[:, 1 + n_patch:], pkg], dim=1)
                probs.append(scores[..., 0].exp())
                n_patch = kept[stage]
                stage += 1
            x = blk(x)
        return SPViTOutput(self._head(x), probs, [])

    def _head(self, x):
        return self.vit.forward_head(self.vit.norm(x))


def masked_prune(selector, x, policy, patches: int, mode: str, tau: float, k: int | None):
    """One pruning location under masking: the selector scores the P patch tokens after the class token,
    the mode decides which stay alive, the newly dropped ones are merged into a package token appended to
    x. Returns (x, policy, soft keep probability [B, P], keep decision [B, P])."""
    B, P = x.shape[0], patches
    scores = selector(x, policy)[:, 1:1 + P]
    alive = policy[:, 1:1 + P]
    keep = pruning.keep_decision(mode, scores, alive, tau, k)
    pkg = pruning.package_token(x[:, 1:1 + P], scores, alive - keep)
    policy = torch.cat([policy[:, :1], keep, policy[:, 1 + P:], policy.new_ones(B, 1)], dim=1)
    return torch.cat([x, pkg], dim=1), policy, scores[..., 0].exp() * alive, keep


def masked_block(blk: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm `Block.forward` with attention under `bias` = `pruning.attention_bias(policy)` (the same
    submodules, masked attention)."""
    x = x + blk.drop_path1(blk.ls1(masked_attention(blk.attn, blk.norm1(x), bias)))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x


def masked_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm `Attention.forward` with the policy as an additive bias of fused attention (SDPA picks a
    kernel that also returns the bias gradient, so nothing of size N x N is kept for backward)."""
    B, N, C = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", C // heads)
    gate_mod = getattr(attn, "gate", None)
    gate = gate_mod(x).sigmoid() if gate_mod is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=attn.scale,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = x.transpose(1, 2).reshape(B, N, heads * head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


class StaticSPViT(nn.Module):
    """The deployable model: images -> logits with the static top-k schedule (for ONNX/TVM)."""

    def __init__(self, spvit: SPViT, kept):
        super().__init__()
        self.spvit = spvit
        self.kept = tuple(int(k) for k in kept)

    def forward(self, images):
        return self.spvit(images, mode="topk", kept=self.kept).logits

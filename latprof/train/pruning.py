"""Pure token-pruning math of SPViT: the multi-head token selector, keep decisions, the package-token
merge and attention under a keep policy. Nothing here knows about timm; `latprof.train.spvit` wires it
into a timm ViT.

Conventions (tensors, never Python numbers, so nothing here synchronises a GPU):
- tokens ``x``: [B, N, D].
- ``scores``: [B, N, 2] log-probabilities, channel 0 = keep, channel 1 = drop.
- ``policy``: [B, N] in {0, 1} (float): 1 = the token is alive. Under straight-through Gumbel-softmax
  the values are exactly 0/1 in the forward pass and carry the soft gradient backwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenSelector(nn.Module):
    """SPViT's multi-head token selector.

    Each head scores every token from its own channel slice: a local feature (the token's own
    projection) concatenated with a global feature (the policy-masked mean over alive tokens), then a
    small MLP to keep/drop logits. A head-attention branch weighs the heads per token (softmax over
    heads), and the weighted per-head probabilities give the token's keep/drop probabilities.
    All heads run at once with grouped (einsum) weights; no Python loop over heads.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads = dim, num_heads
        hd = dim // num_heads
        self.head_dim = hd
        self.norm = nn.LayerNorm(hd)
        # per-head weights: [H, in, out]
        self.w_in = nn.Parameter(torch.empty(num_heads, hd, hd))
        self.b_in = nn.Parameter(torch.zeros(num_heads, hd))
        h1, h2 = max(hd // 2, 2), max(hd // 4, 2)
        self.w1 = nn.Parameter(torch.empty(num_heads, hd, h1))
        self.b1 = nn.Parameter(torch.zeros(num_heads, h1))
        self.w2 = nn.Parameter(torch.empty(num_heads, h1, h2))
        self.b2 = nn.Parameter(torch.zeros(num_heads, h2))
        self.w3 = nn.Parameter(torch.empty(num_heads, h2, 2))
        self.b3 = nn.Parameter(torch.zeros(num_heads, 2))
        self.head_attention = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_heads))
        for w in (self.w_in, self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(w, std=0.02)
        # start by keeping: a positive keep bias, so a fresh selector does not prune at random
        with torch.no_grad():
            self.b3[:, 0].fill_(2.0)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], policy [B, N] -> log-probabilities [B, N, 2] (keep, drop)."""
        logits, head_logits = self.logits(x, policy)
        # log of the head-weighted probabilities, computed in log space: no clamp, so a confident
        # selector's scores stay distinct (a clamp at 1e-8 made them tie exactly) and keep a gradient
        return torch.logsumexp(logits.log_softmax(-1) + head_logits.log_softmax(-1)[..., None], dim=2)

    def logits(self, x: torch.Tensor, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keep/drop logits [B, N, H, 2] and the head-attention logits [B, N, H]."""
        B, N, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        xh = self.norm(x.reshape(B, N, H, hd))
        xh = F.gelu(torch.einsum("bnhc,hcd->bnhd", xh, self.w_in) + self.b_in)
        half = hd // 2
        local, glob = xh[..., :half], xh[..., half:]
        w = policy.to(x.dtype)[:, :, None, None]
        glob = (glob * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)
        feat = torch.cat([local, glob.expand(B, N, H, hd - half)], dim=-1)
        h = F.gelu(torch.einsum("bnhc,hcd->bnhd", feat, self.w1) + self.b1)
        h = F.gelu(torch.einsum("bnhc,hcd->bnhd", h, self.w2) + self.b2)
        return torch.einsum("bnhc,hcd->bnhd", h, self.w3) + self.b3, self.head_attention(x)


def gumbel_keep(scores: torch.Tensor, alive: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Training decision: straight-through hard Gumbel-softmax. Returns keep [B, N] (0/1 forward,
    soft gradient), restricted to tokens that are alive."""
    return F.gumbel_softmax(scores, tau=tau, hard=True)[..., 0] * alive


def threshold_keep(scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Deterministic inference decision with a data-dependent count: keep where p(keep) > p(drop)."""
    return (scores[..., 0] > scores[..., 1]).to(alive.dtype) * alive


def topk_indices(scores: torch.Tensor, alive: torch.Tensor | None, k: int) -> torch.Tensor:
    """Indices [B, k] of the k alive tokens with the highest keep score (static count: fixed shapes)."""
    s = scores[..., 0] - scores[..., 1]
    if alive is not None:
        s = s.masked_fill(alive <= 0, float("-inf"))
    return s.topk(k, dim=1).indices


def topk_keep(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic static decision as a policy: 1 at the top-k alive tokens."""
    idx = topk_indices(scores, alive, k)
    return torch.zeros_like(alive).scatter(1, idx, 1.0)


def keep_decision(mode: str, scores: torch.Tensor, alive: torch.Tensor, tau: float = 1.0, k: int | None = None):
    """The keep policy [B, N] of a masking mode: ``gumbel`` (training), ``threshold``, ``topk-mask`` (k)."""
    if mode == "gumbel":
        return gumbel_keep(scores, alive, tau)
    if mode == "threshold":
        return threshold_keep(scores, alive)
    return topk_keep(scores, alive, k)


def package_token(x: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Merge the tokens dropped at this stage into one package token [B, 1, D], each weighted by its
    drop probability. `dropped` [B, N] marks them (0/1, straight-through in training). When nothing is
    dropped the package token is zero."""
    w = dropped.to(x.dtype) * scores[..., 1].exp().to(x.dtype)
    return (w[..., None] * x).sum(1, keepdim=True) / (w.sum(1)[:, None, None] + 1e-6)


# Floor of the training mask: a dead key keeps weight EPS, so the gradient of log(mask + EPS) reaches it.
EPS = 1e-9


def policy_mask(policy: torch.Tensor) -> torch.Tensor:
    """Multiplicative attention mask [B, 1, N, N] of a keep policy [B, N]: 1 where the key is alive;
    a dead token still attends to itself, so its row stays finite."""
    N = policy.shape[-1]
    p = policy[:, None, None, :]
    eye = torch.eye(N, dtype=p.dtype, device=p.device)[None, None]
    return p + (1.0 - p) * eye


def attention_bias(policy: torch.Tensor) -> torch.Tensor:
    """Additive attention bias [B, 1, N, N] of a keep policy, for fused attention (SDPA), built once
    per pruning stage and shared by its blocks.

    softmax(a + log m) = m e^a / sum(m e^a): the multiplicative mask of `softmax_with_policy`. Its
    gradient d/dm = (1/m) d/d(log m) is 0 x inf at a dead key, so while the policy carries a gradient
    the mask gets a floor EPS: the gradient is then exactly that of the multiplicative form with mask
    m + EPS (a dead key weighs EPS instead of 0, far below bf16 resolution). Without a gradient the bias
    is -inf at dead keys: exact removal."""
    mask = policy_mask(policy)
    return torch.log(mask + EPS) if mask.requires_grad else torch.log(mask)


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Reference masked softmax over keys (SPViT/DynamicViT's form), attn [B, H, N, N] logits, policy
    [B, N]. Multiplicative, so the gradient reaches the policy (straight-through). Equal to removing
    the dead tokens, for the alive rows. The model uses the fused `attention_bias` form of it."""
    mask = policy_mask(policy.to(attn.dtype))
    # subtract the max over alive keys (a dead key's large logit must not underflow the alive ones)
    shift = (attn + (mask.detach() - 1.0) * 1e4).amax(-1, keepdim=True).detach()
    e = (attn - shift).exp() * mask
    return e / e.sum(-1, keepdim=True)

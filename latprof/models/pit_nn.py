"""PiT's torch side: the profiling units and the statically pruned model (`latprof.models.staged`'s
definition, tokens really removed), both over timm's `PoolingVisionTransformer`."""

from __future__ import annotations

import torch
from torch import nn

from latprof.train import pruning


class PatchEmbed(nn.Module):
    """Image -> tokens: overlapping patch convolution, position embedding, class token in front."""

    def __init__(self, pit):
        super().__init__()
        self.pit = pit

    def forward(self, x):
        x = self.pit.patch_embed(x) + self.pit.pos_embed
        return torch.cat((self.pit.cls_token, x.flatten(2).transpose(1, 2)), dim=1)


class Pool(nn.Module):
    """Tokens of stage i-1 (the whole grid) -> tokens of stage i: strided depthwise convolution of the
    grid, Linear of the class token."""

    def __init__(self, pool, grid):
        super().__init__()
        self.pool, self.grid = pool, grid

    def forward(self, x):
        cls, grid = x[:, :1], x[:, 1:]
        grid = grid.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid, self.grid)
        grid, cls = self.pool(grid, cls)
        return torch.cat((cls, grid.flatten(2).transpose(1, 2)), dim=1)


class Head(nn.Module):
    """Final norm and classifier of the class token (the only token PiT's head reads)."""

    def __init__(self, pit):
        super().__init__()
        self.norm, self.head = pit.norm, pit.head

    def forward(self, x):
        return self.head(self.norm(x[:, 0]))


class Selector(nn.Module):
    """SPViT's token selector with every token alive: x [1, N, D] -> keep/drop log-probabilities."""

    def __init__(self, dim, heads):
        super().__init__()
        self.selector = pruning.TokenSelector(dim, heads)

    def forward(self, x):
        return self.selector(x, x.new_ones(x.shape[0], x.shape[1]))


class Merge(nn.Module):
    """Package token: the drop-score-weighted merge of the non-class tokens (scores from two channels of
    the input, as for DeiT's merge unit: one graph input per unit)."""

    def forward(self, x):
        scores = x[..., :2].log_softmax(-1)
        return pruning.package_token(x[:, 1:], scores[:, 1:], x.new_ones(x.shape[0], x.shape[1] - 1))


def location_selectors(layout) -> nn.ModuleList:
    """One token selector per pruning location, sized for its stage (random weights: latency does not
    depend on them)."""
    torch.manual_seed(1)
    return nn.ModuleList(pruning.TokenSelector(layout.stages[layout.location_stage(s)].dim,
                                               layout.stages[layout.location_stage(s)].heads)
                         for s in range(len(layout.locations)))


def rank_key(n: int, seed: int) -> torch.Tensor:
    """A fixed random order of n tokens, 100 apart, added to the selector's log-odds before the top-k.

    With random weights the log-odds of hundreds of tokens saturate or nearly tie, and runtimes then keep
    different tokens, so a whole model's outputs cannot be compared across runtimes. Added to this key,
    the scores cannot reorder tokens: every runtime keeps the same, spatially scattered, set. The
    selector, the top-k and the gathers all still run; which tokens are kept does not change the cost."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).to(torch.float32) * 100.0


class StaticPiT(nn.Module):
    """PiT pruned at the layout's locations with fixed kept counts (batch 1, static shapes).

    At a location the selector scores the tokens arriving; the k best active patch tokens go on with
    the class token and the stage's package tokens (one new: the drop-weighted merge of the tokens
    pruned here); the pruned ones are written back to the grid with their current features. At the end
    of the stage the kept tokens are written back too, package tokens end, and the pooling sees the
    whole grid."""

    def __init__(self, pit, layout, kept):
        super().__init__()
        self.pit, self.layout, self.kept = pit, layout, tuple(kept)
        self.selectors = location_selectors(layout)
        for s in range(len(kept)):  # candidates at location s: the stage's patches, or the previous location's kept
            st = layout.location_stage(s)
            first = s == 0 or layout.location_stage(s - 1) != st
            self.register_buffer(f"rank_{s}", rank_key(layout.stages[st].patches if first else kept[s - 1], s))

    def forward(self, img):
        m, lay = self.pit, self.layout
        x = m.patch_embed(img) + m.pos_embed
        cls = m.cls_token.expand(x.shape[0], -1, -1)
        for st, stage in enumerate(lay.stages):
            tr = m.transformers[st]
            if st:
                x, cls = tr.pool(x, cls)
            # token counts are Python ints, never read from a shape: traced shapes become shape arithmetic
            # that TVM's ONNX importer cannot take
            grid = x.flatten(2).transpose(1, 2)  # [1, P, C]: every patch token, pruned or not
            tokens = torch.cat((cls, grid), dim=1)
            active, n_active = None, stage.patches  # grid positions of the active patch tokens (None: all)
            packages: list[torch.Tensor] = []
            for b, blk in zip(stage.blocks, tr.blocks):
                if b in lay.locations:
                    s = lay.locations.index(b)
                    n_tokens = 1 + n_active + len(packages)
                    scores = self.selectors[s](tokens, torch.ones(1, n_tokens))
                    patches, patch_scores = tokens[:, 1:1 + n_active], scores[:, 1:1 + n_active]
                    # no sort of the indices: ONNX has none (torch exports it as a TopK of a traced size)
                    odds = patch_scores[0, :, 0] - patch_scores[0, :, 1]
                    top = (odds + getattr(self, f"rank_{s}")).topk(self.kept[s]).indices  # see rank_key
                    hit = (torch.arange(n_active)[:, None] == top[None, :]).to(tokens.dtype).sum(1)
                    dropped = (1.0 - hit)[None]  # [1, n_active]: 1 where pruned (no index_fill: see above)
                    grid = patches if active is None else _put(grid, active, patches, stage.dim)
                    active = top if active is None else active[top]
                    n_active = self.kept[s]
                    packages.append(pruning.package_token(patches, patch_scores, dropped))
                    tokens = torch.cat((tokens[:, :1], patches[:, top], *packages), dim=1)
                tokens = blk(tokens)
            cls = tokens[:, :1]
            kept_now = tokens[:, 1:1 + n_active]
            grid = kept_now if active is None else _put(grid, active, kept_now, stage.dim)
            x = grid.transpose(1, 2).reshape(1, stage.dim, stage.grid, stage.grid)
        return m.head(m.norm(cls)[:, 0])


def _put(grid, idx, src, dim: int):
    """grid[:, idx] = src with static sizes (index_copy exports shape arithmetic TVM cannot import)."""
    return grid.scatter(1, idx[None, :, None].expand(1, idx.shape[0], dim), src)


def units(spec, model) -> dict:
    """Per shared key: (torch module, N -> input shape)."""
    lay = spec.layout
    mods = {"patch_embed": (PatchEmbed(model), lambda n: (1, 3, 224, 224)),
            "head": (Head(model), lambda n, d=lay.stages[-1].dim: (1, n, d))}
    for st, stage in enumerate(lay.stages):
        shape = (lambda d: lambda n: (1, n, d))(stage.dim)
        mods[f"block.s{st + 1}"] = (model.transformers[st].blocks[0], shape)
        mods[f"selector.s{st + 1}"] = (Selector(stage.dim, stage.heads).eval(), shape)
        mods[f"merge.s{st + 1}"] = (Merge().eval(), shape)
        if st:
            prev = lay.stages[st - 1]
            mods[f"pool.{st}"] = (Pool(model.transformers[st].pool, prev.grid).eval(),
                                  (lambda d: lambda n: (1, n, d))(prev.dim))
    return mods

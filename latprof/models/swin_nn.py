"""Swin's torch side: the profiling units and the statically pruned model (`latprof.models.staged`'s
definition: k tokens per window processed by each pruned block), both over timm's `SwinTransformer`."""

from __future__ import annotations

import torch
from torch import nn

from latprof.models.pit_nn import Selector, location_selectors, rank_key

WINDOW = 7


def window_block(blk, x, bias, mask=None):
    """One Swin block on partitioned windows x [W, N, C]: attention with `bias` (broadcast to
    [W, heads, N, N]) and the shift `mask` ([W, 1, N, N] or None), then the MLP; both residual."""
    w, n, c = x.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(x)).reshape(w, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * a.scale) @ k.transpose(-2, -1) + bias
    if mask is not None:
        attn = attn + mask
    y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(w, n, c)
    x = x + a.proj(y)
    return x + blk.mlp(blk.norm2(x))


def window_topk_block(blk, w, score, k: int, bias_table, mask_table=None):
    """The block on each window's k best tokens only, written back in place: w [W, 49, C] windows,
    score [W, 49]; the relative position bias (`bias_table` [heads, 49*49]) and the shift mask
    (`mask_table` [W, 49*49] or None) are gathered for the kept pairs. Order of the kept tokens is
    irrelevant (no sort: ONNX has none)."""
    area = WINDOW * WINDOW
    idx = score.topk(k, dim=1).indices                                               # [W, k]
    pair = (idx[:, :, None] * area + idx[:, None, :]).reshape(idx.shape[0], -1)      # [W, k*k]
    bias = bias_table.index_select(1, pair.reshape(-1)).reshape(bias_table.shape[0], idx.shape[0], k, k).transpose(0, 1)
    mask = None if mask_table is None else mask_table.gather(1, pair).reshape(idx.shape[0], 1, k, k)
    take = idx[..., None].expand(-1, -1, w.shape[-1])
    return w.scatter(1, take, window_block(blk, w.gather(1, take), bias, mask))


class WindowBlock(nn.Module):
    """The profiling unit: [windows, N, C] -> [windows, N, C], N tokens per window. The relative position
    bias (and shift mask) of the N processed tokens is a static slice; in the pruned model it is a gather
    of the kept positions (data movement)."""

    def __init__(self, blk):
        super().__init__()
        self.blk = blk
        self.register_buffer("bias", blk.attn._get_rel_pos_bias()[0].detach().clone())            # [heads, 49, 49]
        self.register_buffer("mask", None if blk.attn_mask is None else blk.attn_mask.clone())  # [windows, 49, 49]

    def forward(self, x):
        n = x.shape[1]
        return window_block(self.blk, x, self.bias[:, :n, :n], None if self.mask is None else self.mask[:, None, :n, :n])


class Downsample(nn.Module):
    """timm's PatchMerging with the grid size fixed at build time: traced from x.shape, its reshape
    becomes shape arithmetic that TVM's ONNX importer cannot infer."""

    def __init__(self, merging, grid, dim):
        super().__init__()
        self.merging, self.grid, self.dim = merging, grid, dim

    def forward(self, x):
        g = self.grid // 2
        x = x.reshape(1, g, 2, g, 2, self.dim).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.merging.reduction(self.merging.norm(x))


class Head(nn.Module):
    def __init__(self, swin):
        super().__init__()
        self.norm, self.head = swin.norm, swin.head

    def forward(self, x):
        return self.head(self.norm(x))


def _partition(x, grid):
    """[1, g, g, C] -> [windows, 49, C] (timm's window_partition with static sizes)."""
    c = x.shape[-1]
    n = grid // WINDOW
    return x.reshape(1, n, WINDOW, n, WINDOW, c).permute(0, 1, 3, 2, 4, 5).reshape(n * n, WINDOW * WINDOW, c)


def _reverse(w, grid):
    c = w.shape[-1]
    n = grid // WINDOW
    return w.reshape(1, n, n, WINDOW, WINDOW, c).permute(0, 1, 3, 2, 4, 5).reshape(1, grid, grid, c)


class StaticSwin(nn.Module):
    """Swin pruned at the layout's locations: from a location to the end of its stage (or the next
    location) every block processes, in each of its windows, the k tokens the location's selector scored
    highest there; the others bypass the block and keep their place in the grid."""

    def __init__(self, swin, layout, kept, selectors=None):
        super().__init__()
        self.swin, self.layout, self.kept = swin, layout, tuple(kept)
        # trained selectors choose the tokens; random ones (validation) get a rank key so every runtime
        # keeps the same tokens
        self.selectors = selectors if selectors is not None else location_selectors(layout)
        self.ranked = selectors is None
        for s in range(len(kept)):
            stage = layout.stages[layout.location_stage(s)]
            if self.ranked:
                self.register_buffer(f"rank_{s}", rank_key(stage.patches, s).reshape(1, stage.grid, stage.grid, 1))
        area = WINDOW * WINDOW
        self.downsample = nn.ModuleList(
            Downsample(swin.layers[i].downsample, layout.stages[i - 1].grid, layout.stages[i - 1].dim)
            for i in range(1, len(layout.stages)))
        for i, layer in enumerate(swin.layers):
            for j, blk in enumerate(layer.blocks):
                self.register_buffer(f"bias_{i}_{j}", blk.attn._get_rel_pos_bias()[0].reshape(-1, area * area).clone())
                if blk.attn_mask is not None:
                    self.register_buffer(f"mask_{i}_{j}", blk.attn_mask.reshape(-1, area * area).clone())

    def _dense_block(self, st, j, blk, x, grid):
        """timm's block with static shapes (its own forward traces x.shape into shape arithmetic)."""
        shift = blk.shift_size
        if any(shift):
            x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
        area = WINDOW * WINDOW
        bias = getattr(self, f"bias_{st}_{j}").reshape(-1, area, area)
        mask = getattr(self, f"mask_{st}_{j}", None)
        mask = None if mask is None else mask.reshape(-1, 1, area, area)
        x = _reverse(window_block(blk, _partition(x, grid), bias, mask), grid)
        return torch.roll(x, shift, (1, 2)) if any(shift) else x

    def _pruned_block(self, st, j, blk, x, score, k, grid):
        shift = blk.shift_size
        if any(shift):
            x, score = (torch.roll(t, (-shift[0], -shift[1]), (1, 2)) for t in (x, score))
        w = window_topk_block(blk, _partition(x, grid), _partition(score, grid)[..., 0], k,
                              getattr(self, f"bias_{st}_{j}"), getattr(self, f"mask_{st}_{j}", None))
        x = _reverse(w, grid)
        return torch.roll(x, shift, (1, 2)) if any(shift) else x

    def forward(self, img):
        m, lay = self.swin, self.layout
        x = m.patch_embed(img)
        for st, stage in enumerate(lay.stages):
            layer = m.layers[st]
            if st:
                x = self.downsample[st - 1](x)
            score, k = None, None
            for j, (b, blk) in enumerate(zip(stage.blocks, layer.blocks)):
                if b in lay.locations:
                    s = lay.locations.index(b)
                    k = self.kept[s]
                    tokens = x.reshape(1, stage.patches, stage.dim)
                    scores = self.selectors[s](tokens, tokens.new_ones(1, stage.patches))
                    odds = (scores[..., 0] - scores[..., 1]).reshape(1, stage.grid, stage.grid, 1)
                    score = odds + getattr(self, f"rank_{s}") if self.ranked else odds  # pit_nn.rank_key
                if score is None or k == stage.window:
                    x = self._dense_block(st, j, blk, x, stage.grid)
                else:
                    x = self._pruned_block(st, j, blk, x, score, k, stage.grid)
        return m.head(m.norm(x))


def units(spec, model) -> dict:
    """Per shared key: (torch module, N -> input shape)."""
    from latprof.models.swin import shifted

    lay = spec.layout
    last = lay.stages[-1]
    mods = {"patch_embed": (model.patch_embed, lambda n: (1, 3, 224, 224)),
            "head": (Head(model), lambda n: (1, last.grid, last.grid, last.dim))}
    for st, stage in enumerate(lay.stages):
        layer = model.layers[st]
        shape = (lambda w, d: lambda n: (w, n, d))(stage.windows, stage.dim)
        mods[f"block.s{st + 1}"] = (WindowBlock(layer.blocks[0]).eval(), shape)
        if stage.depth > 1 and shifted(stage, stage.first + 1):
            mods[f"block.s{st + 1}.shift"] = (WindowBlock(layer.blocks[1]).eval(), shape)
        mods[f"selector.s{st + 1}"] = (Selector(stage.dim, stage.heads).eval(),
                                       (lambda p, d: lambda n: (1, p, d))(stage.patches, stage.dim))
        if st:
            prev = lay.stages[st - 1]
            mods[f"downsample.{st}"] = (Downsample(layer.downsample, prev.grid, prev.dim).eval(),
                                        (lambda g, d: lambda n: (1, g, g, d))(prev.grid, prev.dim))
    return mods

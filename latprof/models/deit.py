"""DeiT (timm's `deit_*_patch16_224`): patch embedding, 12 identical blocks, head.

SPViT inserts token selectors before blocks 3, 6, 9 (0-based): its default pruning locations. Each
pruning location s (1-based) adds two units of its own, functions of N, the tokens the selector sees
(class + kept patches + package tokens of stage s-1): ``selector.s`` (SPViT's multi-head token selector)
and ``merge.s`` (the package-token merge), built from `latprof.train.units`. The top-k gather and concat
that remove the tokens are data movement left out of every unit (see `latprof.predict`'s overhead model).
"""

from __future__ import annotations

from latprof.models import ModelSpec, Unit, register, timm_model

_DEIT = {
    "deit_t": ("deit_tiny_patch16_224", 192, 3),
    "deit_s": ("deit_small_patch16_224", 384, 6),
    "deit_b": ("deit_base_patch16_224", 768, 12),
}
DEPTH = 12
TOKENS = 197  # 196 patches + class token
PRUNING_LOCATIONS = (3, 6, 9)


def _spec(name: str) -> ModelSpec:
    timm_name, dim, heads = _DEIT[name]
    units = [Unit("patch_embed", "fixed", 0, "patch_embed", fixed_tokens=TOKENS)]
    for i in range(DEPTH):
        if i in PRUNING_LOCATIONS:
            s = PRUNING_LOCATIONS.index(i) + 1
            units.append(Unit(f"selector.{s}", "tokens", len(units), "selector"))
            units.append(Unit(f"merge.{s}", "tokens", len(units), "merge"))
        units.append(Unit(f"blocks.{i}", "tokens", len(units), "block"))
    units.append(Unit("head", "tokens", len(units), "head"))
    return ModelSpec(name=name, timm_name=timm_name, family="deit", max_tokens=TOKENS,
                     pruning_locations=PRUNING_LOCATIONS, units=units, builder=build,
                     description=f"timm {timm_name}: dim {dim}, {heads} heads, {DEPTH} blocks")


for _name in _DEIT:
    register(_name)(lambda _n=_name: _spec(_n))


def build(spec: ModelSpec):
    """The timm model and, per shared key, a torch module for that unit.

    Weights are timm's seeded random initialisation: latency does not depend on their values.
    """
    from torch import nn

    model = timm_model(spec.timm_name)

    class PatchEmbed(nn.Module):
        """Image -> tokens: patch projection, class token, position embedding."""

        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            return self.vit._pos_embed(self.vit.patch_embed(x))

    class Head(nn.Module):
        """Final norm over all N tokens, class-token pooling, classifier."""

        def __init__(self, vit):
            super().__init__()
            self.norm, self.head = vit.norm, vit.head

        def forward(self, x):
            return self.head(self.norm(x)[:, 0])

    class Merge(nn.Module):
        """`latprof.train.units`' package-token merge with one graph input, as every unit has: the
        keep/drop scores are a log-softmax over two channels of the tokens (O(N), negligible next to
        the O(N x D) weighted reduction it feeds)."""

        def __init__(self, merge):
            super().__init__()
            self.merge = merge

        def forward(self, x):
            return self.merge(x, x[..., :2].log_softmax(-1))

    from latprof.train.units import selector_and_merge_modules

    spvit = selector_and_merge_modules(spec.name)
    dim = model.embed_dim
    modules = {
        "patch_embed": (PatchEmbed(model), lambda n: (1, 3, 224, 224)),
        "block": (model.blocks[0], lambda n: (1, n, dim)),
        "head": (Head(model), lambda n: (1, n, dim)),
        "selector": (spvit["selector"][0], lambda n: (1, n, dim)),
        "merge": (Merge(spvit["merge"][0]).eval(), lambda n: (1, n, dim)),
    }
    return model, modules

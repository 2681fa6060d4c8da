"""PiT (timm's `pit_*_224`): a convolutional patch embedding, three stages of ViT blocks with global
attention and one class token, a strided depthwise pooling between stages, and a class-token head.

Stages (224 x 224 input, patch 16, stride 8): 27 x 27, 14 x 14 and 7 x 7 patch tokens, 2, 6 and 4 blocks,
dimension 48 x heads. Pruning locations, one per stage after its first block: before blocks 1, 4 and 9
(global, 0-based). What a pruned token count means is in `latprof.models.staged` (pruned tokens bypass
the rest of their stage and are back in the grid at the pooling; package tokens live until the stage
ends). Units: ``patch_embed``, ``blocks.i`` (N = 1 + kept + package tokens, up to 1 + P of the stage),
``selector.s`` and ``merge.s`` at each location, ``pool.1`` and ``pool.2`` (fixed: they always see the
whole grid) and ``head`` (fixed: norm and classifier of the class token only).
"""

from __future__ import annotations

from latprof.models import ModelSpec, Unit, register, timm_model
from latprof.models.staged import Stage, StagedLayout

_PIT = {
    "pit_xs": ("pit_xs_224", (2, 4, 8)),
    "pit_s": ("pit_s_224", (3, 6, 12)),
}
BASE_DIM = 48
DEPTHS = (2, 6, 4)
GRIDS = (27, 14, 7)
PATCH = 16
LOCATIONS = (1, 4, 9)


def layout(name: str) -> StagedLayout:
    heads = _PIT[name][1]
    stages, first = [], 0
    for d, h, g in zip(DEPTHS, heads, GRIDS):
        stages.append(Stage(first, d, BASE_DIM * h, h, g))
        first += d
    return StagedLayout("pit", stages, LOCATIONS, PATCH, cls_tokens=1, package=True)


def _spec(name: str) -> ModelSpec:
    lay = layout(name)
    units = [Unit("patch_embed", "fixed", 0, "patch_embed", fixed_tokens=1 + lay.stages[0].patches)]
    for st, stage in enumerate(lay.stages):
        n_max = lay.dense_tokens(st)
        if st:
            units.append(Unit(f"pool.{st}", "fixed", len(units), f"pool.{st}", fixed_tokens=lay.dense_tokens(st - 1)))
        for b in stage.blocks:
            if b in lay.locations:
                s = lay.locations.index(b) + 1
                units.append(Unit(f"selector.{s}", "tokens", len(units), f"selector.s{st + 1}", max_tokens=n_max))
                units.append(Unit(f"merge.{s}", "tokens", len(units), f"merge.s{st + 1}", max_tokens=n_max))
            units.append(Unit(f"blocks.{b}", "tokens", len(units), f"block.s{st + 1}", max_tokens=n_max))
    units.append(Unit("head", "fixed", len(units), "head", fixed_tokens=lay.dense_tokens(len(lay.stages) - 1)))
    dims = "/".join(str(s.dim) for s in lay.stages)
    return ModelSpec(name=name, timm_name=_PIT[name][0], family="pit", max_tokens=lay.dense_tokens(0),
                     pruning_locations=LOCATIONS, units=units, builder=build, layout=lay, pruned=pruned,
                     description=f"timm {_PIT[name][0]}: dims {dims}, depths {'/'.join(map(str, DEPTHS))}, "
                                 f"grids {'/'.join(f'{g}x{g}' for g in GRIDS)} + class token")


for _name in _PIT:
    register(_name)(lambda _n=_name: _spec(_n))


def build(spec: ModelSpec):
    """The timm model and, per shared key, a torch module for that unit (seeded random weights)."""
    from latprof.models import pit_nn

    model = timm_model(spec.timm_name)
    return model, pit_nn.units(spec, model)


def pruned(spec: ModelSpec, kept):
    """The whole model pruned with `kept` patch tokens per location (static shapes, tokens removed)."""
    from latprof.models import pit_nn

    return pit_nn.StaticPiT(timm_model(spec.timm_name), spec.layout, kept).eval()

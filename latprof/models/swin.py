"""Swin (timm's `swin_*_patch4_window7_224`): patch embedding, four stages of window-attention blocks
(every second block with shifted windows, except in the last stage where one window covers the grid),
2 x 2 patch merging between stages, and an average-pooling head.

Stages (224 x 224, patch 4): 56 x 56, 28 x 28, 14 x 14 and 7 x 7 tokens in 7 x 7 windows (64, 16, 4 and 1
windows), dimension 96, 192, 384, 768. Pruning happens in stage 3, which holds most blocks: two
locations, a third and two thirds into the stage, both before an unshifted block (Swin-T: before blocks
6 and 8; Swin-S: 10 and 16). A pruned token count is the number of tokens each window processes in a
block (1..49, see `latprof.models.staged`). Units: ``patch_embed``, ``blocks.i`` (shared per stage and
shift: ``block.s3`` and ``block.s3.shift`` differ by the shift mask), ``downsample.1..3`` (fixed),
``selector.s`` (fixed: it scores the whole grid of its stage) and ``head`` (fixed).
"""

from __future__ import annotations

from latprof.models import ModelSpec, Unit, register, timm_model
from latprof.models.staged import Stage, StagedLayout

_SWIN = {
    "swin_t": ("swin_tiny_patch4_window7_224", (2, 2, 6, 2)),
    "swin_s": ("swin_small_patch4_window7_224", (2, 2, 18, 2)),
}
EMBED = 96
HEADS = (3, 6, 12, 24)
GRIDS = (56, 28, 14, 7)
WINDOW = 7
PATCH = 4
PRUNED_STAGE = 2  # 0-based: stage 3


def layout(name: str) -> StagedLayout:
    depths = _SWIN[name][1]
    stages, first = [], 0
    for i, (d, h, g) in enumerate(zip(depths, HEADS, GRIDS)):
        stages.append(Stage(first, d, EMBED * 2 ** i, h, g, window=WINDOW * WINDOW))
        first += d
    st = stages[PRUNED_STAGE]
    third = st.depth // 3 // 2 * 2  # even: the pruned blocks start with an unshifted one
    return StagedLayout("swin", stages, (st.first + third, st.first + 2 * third), PATCH, cls_tokens=0, package=False)


def shifted(stage: Stage, block: int) -> bool:
    """timm shifts every second block of a stage, unless one window already covers the grid."""
    return (block - stage.first) % 2 == 1 and stage.grid > WINDOW


def _spec(name: str) -> ModelSpec:
    lay = layout(name)
    units = [Unit("patch_embed", "fixed", 0, "patch_embed", fixed_tokens=lay.stages[0].patches)]
    for st, stage in enumerate(lay.stages):
        if st:
            units.append(Unit(f"downsample.{st}", "fixed", len(units), f"downsample.{st}",
                              fixed_tokens=lay.stages[st - 1].patches))
        for b in stage.blocks:
            if b in lay.locations:
                s = lay.locations.index(b) + 1
                units.append(Unit(f"selector.{s}", "fixed", len(units), f"selector.s{st + 1}",
                                  fixed_tokens=stage.patches))
            key = f"block.s{st + 1}" + (".shift" if shifted(stage, b) else "")
            units.append(Unit(f"blocks.{b}", "tokens", len(units), key, max_tokens=stage.window))
    units.append(Unit("head", "fixed", len(units), "head", fixed_tokens=lay.stages[-1].patches))
    timm_name, depths = _SWIN[name]
    return ModelSpec(name=name, timm_name=timm_name, family="swin", max_tokens=WINDOW * WINDOW,
                     pruning_locations=lay.locations, units=units, builder=build, layout=lay, pruned=pruned,
                     description=f"timm {timm_name}: dim {EMBED}..{EMBED * 8}, depths {'/'.join(map(str, depths))}, "
                                 f"7x7 windows (N = tokens per window)")


for _name in _SWIN:
    register(_name)(lambda _n=_name: _spec(_n))


def build(spec: ModelSpec):
    """The timm model and, per shared key, a torch module for that unit (seeded random weights)."""
    from latprof.models import swin_nn

    model = timm_model(spec.timm_name)
    return model, swin_nn.units(spec, model)


def pruned(spec: ModelSpec, kept):
    """The whole model pruned with `kept` tokens per window per location (static shapes)."""
    from latprof.models import swin_nn

    return swin_nn.StaticSwin(timm_model(spec.timm_name), spec.layout, kept).eval()

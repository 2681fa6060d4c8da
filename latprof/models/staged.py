"""Token schedules of hierarchical ViTs (PiT, Swin): what a pruned token count means, per stage.

A hierarchical model's stages end in a layer that needs the whole spatial grid (PiT's strided depthwise
pooling, Swin's patch merging), and Swin's shifted windows need it in every block. So pruning here never
removes a token from the grid for good; it decides which tokens the *blocks* process:

- pruning happens at locations inside a stage (before a given block); the blocks from there to the end
  of the stage process only the kept tokens; the pruned ones bypass those blocks unchanged and keep their
  place in the grid, so the next stage's pooling or merging reads a complete grid;
- every stage starts dense again (a later stage can prune again, with its own locations);
- kept counts are non-increasing among the locations of one stage.

What N (the token count of a unit) means per family:

- PiT (global attention, one class token): as for DeiT, N = 1 (class) + k (kept patches) + j (package
  tokens: one per location passed in this stage; a package token is the score-weighted merge of the
  tokens pruned there). Package tokens live until the end of their stage: at the pooling the pruned tokens
  are back in the grid, so their information is not lost. k is at most P - j (P patches of the stage), so
  a pruned stage never sees more tokens than the dense one. Selector and merge units see the N arriving
  at their location.
- Swin (windowed attention, no class token): N counts the tokens of one window that a block processes,
  the same k in every window (top-k by the selector's score inside each of that block's windows, so
  shifted windows pick their own). A unit is one block applied to all windows at once: input
  [windows, N, C]. Dense is N = 49 (7 x 7). No package token: a window's pruned tokens stay in the grid
  and are seen again by the next block whose windows select them, and by the patch merging. The selector
  scores every token of the stage's grid: a fixed-cost unit.

The window partition, cyclic shift, gather and scatter around a unit are data movement and belong to no
unit, like DeiT's top-k gather (latprof.predict's overhead model covers them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latprof.errors import UsageError

MLP_RATIO = 4
CLASSES = 1000


@dataclass(frozen=True)
class Stage:
    first: int          # global index of the stage's first block
    depth: int
    dim: int
    heads: int
    grid: int           # spatial side: grid x grid patch tokens
    window: int = 0     # Swin: tokens per window (49); 0: global attention over the whole stage

    @property
    def blocks(self) -> range:
        return range(self.first, self.first + self.depth)

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    @property
    def windows(self) -> int:
        return self.patches // self.window if self.window else 1


@dataclass(frozen=True)
class StagedSchedule:
    """Kept tokens per pruning location of a hierarchical model (PiT: patch tokens of the stage;
    Swin: tokens per window). `limits[s]` is the most location s can keep."""

    locations: tuple[int, ...]
    stage_of: tuple[int, ...]
    limits: tuple[int, ...]
    kept: tuple[int, ...]
    depth: int
    layout: "StagedLayout" = field(default=None, compare=False, repr=False)

    def block_tokens(self) -> list[int]:
        return self.layout.block_tokens(self)

    def __post_init__(self):
        if len(self.kept) != len(self.locations):
            raise UsageError(f"{len(self.kept)} keep values for {len(self.locations)} pruning locations",
                             f"give one value per location {list(self.locations)}")
        for s, k in enumerate(self.kept):
            prev = self.kept[s - 1] if s and self.stage_of[s - 1] == self.stage_of[s] else self.limits[s]
            if not 1 <= k <= min(prev, self.limits[s]):
                raise UsageError(f"location {s + 1} (before block {self.locations[s]}) keeps {k} tokens; it can keep "
                                 f"1..{min(prev, self.limits[s])}",
                                 "keep counts are non-increasing within a stage and every stage starts dense")


class StagedLayout:
    """The schedule rules of one hierarchical model (see the module docstring)."""

    def __init__(self, family: str, stages: list[Stage], locations: tuple[int, ...], patch: int,
                 cls_tokens: int, package: bool):
        self.family, self.stages, self.locations = family, stages, tuple(locations)
        self.patch, self.cls, self.package = patch, cls_tokens, package
        self.depth = sum(st.depth for st in stages)

    # -- structure ---------------------------------------------------------------------------------
    def stage_index(self, block: int) -> int:
        return next(i for i, st in enumerate(self.stages) if block in st.blocks)

    def location_stage(self, s: int) -> int:
        return self.stage_index(self.locations[s])

    def rank_in_stage(self, s: int) -> int:
        """1-based rank of location s among its stage's locations."""
        st = self.location_stage(s)
        return sum(1 for t in range(s + 1) if self.location_stage(t) == st)

    def dense_tokens(self, st: int) -> int:
        """N a block of stage st sees without pruning."""
        stage = self.stages[st]
        return stage.window if stage.window else self.cls + stage.patches

    def whole(self, s: int) -> int:
        """What location s's kept count is a share of: the stage's patches (PiT) or a window's tokens (Swin)."""
        stage = self.stages[self.location_stage(s)]
        return stage.window or stage.patches

    def _passed(self, block: int) -> list[int]:
        """The pruning locations of block's stage at or before it."""
        st = self.stage_index(block)
        return [s for s, loc in enumerate(self.locations) if loc <= block and self.location_stage(s) == st]

    def limit(self, s: int) -> int:
        stage = self.stages[self.location_stage(s)]
        if stage.window:
            return stage.window
        return stage.patches - (self.rank_in_stage(s) if self.package else 0)

    # -- schedules ---------------------------------------------------------------------------------
    def schedule(self, kept) -> StagedSchedule:
        return StagedSchedule(self.locations, tuple(self.location_stage(s) for s in range(len(self.locations))),
                              tuple(self.limit(s) for s in range(len(self.locations))), tuple(int(k) for k in kept),
                              self.depth, self)

    def from_block_tokens(self, ns: list[int]) -> StagedSchedule:
        """Explicit N per block -> the schedule it describes (an error if it describes none)."""
        if len(ns) != self.depth:
            raise UsageError(f"{len(ns)} token counts for {self.depth} blocks", "give one N per block")
        kept = [self.kept_for(s, ns[loc]) for s, loc in enumerate(self.locations)]
        sched = self.schedule(kept)
        if self.block_tokens(sched) != list(ns):
            raise UsageError(f"token counts {list(ns)} are not a {self.family} schedule (expected "
                             f"{self.block_tokens(sched)} for the kept counts {kept} at the locations "
                             f"{list(self.locations)})",
                             "tokens change only at the pruning locations, and every stage starts dense")
        return sched

    def dense_unit_tokens(self, spec) -> dict[str, int]:
        """N of every unit of the dense model (no selectors, no merges)."""
        out = {}
        for u in spec.units:
            kind, _, idx = u.name.partition(".")
            if u.kind == "fixed" and kind != "selector":
                out[u.name] = int(u.fixed_tokens)
            elif kind == "blocks":
                out[u.name] = self.dense_tokens(self.stage_index(int(idx)))
        return out

    def from_ratios(self, ratios) -> StagedSchedule:
        """Ratios are shares of the stage's patch tokens (PiT) or of a window's tokens (Swin),
        cumulative within a stage; every stage starts from 1 again."""
        return self.schedule([min(self.limit(s), max(1, round(self.whole(s) * r))) for s, r in enumerate(ratios)])

    @property
    def kept_label(self) -> str:
        return "kept tokens per window" if self.stages[0].window else "kept patches of the stage"

    def block_tokens(self, sched: StagedSchedule) -> list[int]:
        return [self._block_n(sched, b) for b in range(self.depth)]

    def _block_n(self, sched: StagedSchedule, block: int) -> int:
        st = self.stage_index(block)
        passed = self._passed(block)
        if not passed:
            return self.dense_tokens(st)
        s = passed[-1]
        if self.stages[st].window:
            return sched.kept[s]
        return self.cls + sched.kept[s] + (len(passed) if self.package else 0)

    def unit_location(self, unit: str) -> int | None:
        """The pruning location whose kept count sets this unit's N (None: the unit's N is fixed)."""
        kind, _, idx = unit.partition(".")
        if kind == "blocks":
            passed = self._passed(int(idx))
            return passed[-1] if passed else None
        if kind in ("selector", "merge") and not self.stages[self.location_stage(int(idx) - 1)].window:
            s = int(idx) - 1  # PiT: it sees the N arriving, set by the previous location of its stage
            return s - 1 if s and self.location_stage(s - 1) == self.location_stage(s) else None
        return None

    def kept_for(self, s: int, n: int) -> int:
        """The kept count at location s that gives its blocks N tokens (inverse of the block N rule)."""
        if self.stages[self.location_stage(s)].window:
            return n
        return n - self.cls - (self.rank_in_stage(s) if self.package else 0)

    def unit_tokens(self, spec, sched: StagedSchedule) -> dict[str, int]:
        """N of every unit of `spec` under `sched` (fixed units at their own N)."""
        blocks = self.block_tokens(sched)
        out = {}
        for u in spec.units:
            kind, _, idx = u.name.partition(".")
            if u.kind == "fixed":
                out[u.name] = int(u.fixed_tokens)
            elif kind == "blocks":
                out[u.name] = blocks[int(idx)]
            elif kind in ("selector", "merge"):  # the N arriving at location s: that of the block before it
                s = int(idx) - 1
                loc = self.locations[s]
                st = self.location_stage(s)
                out[u.name] = blocks[loc - 1] if loc > self.stages[st].first else self.dense_tokens(st)
            else:
                raise UsageError(f"unit '{u.name}' of {spec.name} has no place in a token schedule",
                                 "extend latprof.models.staged for this unit")
        return out

    # -- MACs --------------------------------------------------------------------------------------
    def unit_macs(self, unit: str, n: int) -> int:
        """Multiply-accumulates of one unit at N tokens (batch 1); norms, softmax, GELU, adds left out."""
        kind, _, idx = unit.partition(".")
        if kind == "blocks":
            st = self.stages[self.stage_index(int(idx))]
            d, w = st.dim, st.windows
            # per window: qkv 3ND^2, q@k^T and attn@v 2N^2D, proj ND^2, MLP 2*N*D*(4D)
            return int(w * (4 * n * d * d + 2 * n * n * d + 2 * n * d * MLP_RATIO * d))
        if kind == "selector":
            st = self.stages[self.location_stage(int(idx) - 1)]
            return selector_macs(n, st.dim, st.heads)
        if kind == "merge":
            return int((n - self.cls) * self.stages[self.location_stage(int(idx) - 1)].dim)
        if kind == "patch_embed":
            st = self.stages[0]
            return int(st.patches * 3 * self.patch * self.patch * st.dim)
        if kind in ("pool", "downsample"):  # between stage i-1 and stage i
            prev, st = self.stages[int(idx) - 1], self.stages[int(idx)]
            if kind == "pool":  # PiT: depthwise 3x3 stride 2 (C -> 2C, groups C) + the class token's Linear
                return int(st.patches * st.dim * 9 + self.cls * prev.dim * st.dim)
            return int(st.patches * 4 * prev.dim * st.dim)  # Swin: 2x2 patch merging, Linear(4C, 2C)
        if kind == "head":
            return int(self.stages[-1].dim * CLASSES)
        raise UsageError(f"no MAC count for unit '{unit}'", f"extend latprof.models.staged for the {self.family} family")


def selector_macs(n: int, d: int, h: int) -> int:
    """SPViT's multi-head token selector (latprof.train.pruning.TokenSelector) on N tokens."""
    hd = d // h
    h1, h2 = max(hd // 2, 2), max(hd // 4, 2)
    per_head = hd * hd + hd * h1 + h1 * h2 + h2 * 2  # w_in, w1, w2, w3 of each head
    return int(n * (h * per_head + d * h))           # + head-attention Linear(D, H)

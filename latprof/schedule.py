"""Token schedules: how many tokens each unit sees when tokens are pruned at the pruning locations.

SPViT convention used everywhere in latprof (prediction, validation, training):
- stage 0 runs before the first pruning location with all P patch tokens (P = 196 for DeiT at 224).
- at pruning location s (1-based stage s), a token selector keeps k_s patch tokens (non-increasing)
  and folds the pruned ones into one package token, which is never pruned again.
- so a block in stage s sees N = 1 (class) + k_s (kept patches) + s (package tokens so far).
The selector at location s sees the tokens of stage s-1; the merge outputs the tokens of stage s.
"""

from __future__ import annotations

from dataclasses import dataclass

from latprof.errors import UsageError


@dataclass(frozen=True)
class TokenSchedule:
    patches: int                      # P, patch tokens of the dense model
    locations: tuple[int, ...]        # block indices where pruning happens (before that block)
    kept: tuple[int, ...]             # kept patch tokens per pruning stage
    depth: int

    def __post_init__(self):
        if len(self.kept) != len(self.locations):
            raise UsageError(f"{len(self.kept)} keep values for {len(self.locations)} pruning locations",
                             f"give one value per location {list(self.locations)}")
        prev = self.patches
        for k in self.kept:
            if not 1 <= k <= prev:
                raise UsageError(f"kept patch tokens {list(self.kept)} must be non-increasing and within 1..{self.patches}",
                                 "use keep ratios in (0, 1], non-increasing through the network")
            prev = k

    @classmethod
    def from_ratios(cls, patches: int, locations, ratios, depth: int) -> "TokenSchedule":
        """Ratios are cumulative shares of the patch tokens (SPViT's 0.7, 0.49, 0.343 style)."""
        for r in ratios:
            if not 0 < r <= 1:
                raise UsageError(f"keep ratio {r} is outside (0, 1]", "use values like 0.7,0.49,0.343")
        return cls(patches, tuple(locations), tuple(max(1, round(patches * r)) for r in ratios), depth)

    def stage_tokens(self, stage: int) -> int:
        """N seen by a block of stage `stage` (0 = before any pruning)."""
        if stage == 0:
            return 1 + self.patches
        return 1 + self.kept[stage - 1] + stage

    def block_tokens(self) -> list[int]:
        """N for every block 0..depth-1."""
        out, stage = [], 0
        for i in range(self.depth):
            while stage < len(self.locations) and i >= self.locations[stage]:
                stage += 1
            out.append(self.stage_tokens(stage))
        return out

    def final_tokens(self) -> int:
        return self.stage_tokens(len(self.locations))

"""Model registry: a model is a list of profiling units.

A new ViT family is one small module that registers its models with `@register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from latprof.errors import UsageError


@dataclass(frozen=True)
class Unit:
    """One profiling unit of a model.

    kind "fixed": the cost does not depend on the token count (measured once, at `fixed_tokens`).
    kind "tokens": the cost is a function of N, every token the unit sees (class + kept + package),
    from 1 to `max_tokens` (default: the model's). In a hierarchical model each stage has its own range,
    and for windowed attention (Swin) N counts the tokens of one window (see the family's module).
    Units with the same `shared` key have the same structure and shapes: compiled and measured once.
    """

    name: str
    kind: str
    position: int
    shared: str
    fixed_tokens: int | None = None
    max_tokens: int | None = None


@dataclass
class ModelSpec:
    name: str
    timm_name: str
    family: str
    max_tokens: int
    pruning_locations: tuple[int, ...]
    units: list[Unit]
    # build(model_spec) -> (torch model, {shared_key: (module_factory, input_factory)})
    builder: Callable = field(repr=False, default=None)
    description: str = ""
    # the family's token-schedule rules (latprof.models.staged); None: DeiT's flat rules in latprof.predict
    layout: object = field(repr=False, default=None)
    # pruned(spec, kept) -> the whole model pruned with static kept counts (hierarchical families)
    pruned: Callable = field(repr=False, default=None)

    def unit_max(self, unit: Unit) -> int:
        """The most tokens a token-dependent unit sees (its dense count)."""
        return unit.max_tokens or self.max_tokens

    def unit_by_shared(self, shared: str) -> Unit:
        return next(u for u in self.units if u.shared == shared)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise UsageError(f"model '{self.name}' has no unit '{name}'",
                         f"choose from {', '.join(u.name for u in self.units)}")


def timm_model(timm_name: str):
    """timm's definition with seeded random weights (latency does not depend on their values), in eval
    mode, fused attention off everywhere (the ONNX exporter has no fused SDPA; the math is the same)."""
    import torch

    from latprof.errors import require

    timm = require("timm", "models")
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}


def register(name: str):
    def wrap(fn: Callable[[], ModelSpec]):
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def get_model(name: str) -> ModelSpec:
    _load_families()
    if name not in _REGISTRY:
        raise UsageError(f"unknown model '{name}'", f"choose one of: {', '.join(sorted(_REGISTRY))} (see `latprof models`)")
    return _REGISTRY[name]()


def _load_families() -> None:
    from latprof.models import deit, pit, swin  # noqa: F401  (each registers its models)

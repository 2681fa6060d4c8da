"""SPViT's own profiling units, for the profiler: one token selector and one package-token merge.

`selector_and_merge_modules(model_name)` returns
    {"selector": (module, make_inputs), "merge": (module, make_inputs)}
where `make_inputs(N)` returns the tuple of example tensors for N tokens (the tokens the selector sees:
class + kept patches + package tokens, the table's `selector.s` / `merge.s` convention):
- selector: forward(x [1, N, D]) -> scores [1, N, 2] (keep/drop log-probabilities); every token alive.
- merge: forward(x [1, N, D], scores [1, N, 2]) -> package token [1, 1, D], the drop-probability-weighted
  mean of the N - 1 non-class tokens (the weighted reduction; the top-k gather of the kept tokens is a
  copy and is left to the block that follows).
Weights are seeded random: latency does not depend on their values.
"""

from __future__ import annotations

from latprof.errors import require


def selector_and_merge_modules(model_name: str) -> dict:
    import torch
    from torch import nn

    from latprof.models import get_model
    from latprof.train import pruning

    timm = require("timm", "train")
    spec = get_model(model_name)
    torch.manual_seed(0)
    vit = timm.create_model(spec.timm_name, pretrained=False)
    dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads

    class Selector(nn.Module):
        def __init__(self):
            super().__init__()
            self.selector = pruning.TokenSelector(dim, heads)

        def forward(self, x):
            return self.selector(x, x.new_ones(x.shape[0], x.shape[1]))

    class Merge(nn.Module):
        def forward(self, x, scores):
            return pruning.package_token(x[:, 1:], scores[:, 1:], x.new_ones(x.shape[0], x.shape[1] - 1))

    def selector_inputs(n):
        return (torch.randn(1, n, dim),)

    def merge_inputs(n):
        return (torch.randn(1, n, dim), torch.randn(1, n, 2).log_softmax(-1))

    return {"selector": (Selector().eval(), selector_inputs), "merge": (Merge().eval(), merge_inputs)}

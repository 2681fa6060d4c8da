"""SPViT training against latency lookup tables.

Modules: `pruning` (pure token-pruning math), `spvit` (the timm wrapper), `latency` (table -> predicted
latency, numpy and torch), `solver` (keep-ratio solver), `loss` (latency-sparsity loss), `data`,
`weights`, `trainer` (the run, DDP), `export` (ONNX), `units` (selector/merge units for the profiler),
`cli` (click commands `train`, `export`). Heavy imports (torch, timm) stay inside those modules.
"""

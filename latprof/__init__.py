"""latprof: per-block latency lookup tables for token-pruned Vision Transformers."""

__version__ = "0.1.0"

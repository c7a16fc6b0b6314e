"""magitrain: distributed training for chunk-causal (MAGI-1-style) video diffusion transformers."""

__version__ = "0.1.0"

"""rmae: fast, faithful R-MAE (Regions Meet Masked Autoencoders) pre-training."""

__version__ = "0.1.0"

"""rmae: fast, faithful R-MAE (Regions Meet Masked Autoencoders) pre-training."""

from rmae.cores import usable_cores

__version__ = "0.1.0"

__all__ = ["usable_cores", "__version__"]

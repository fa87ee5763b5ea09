"""Triton kernels for the R-MAE region branch, installed as ``rmae.kernels``."""

"""Test setup: Triton kernels run through the interpreter on CPU-only machines."""
import os

# Must be set before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

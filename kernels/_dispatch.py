"""Shared helpers: choosing Triton or the PyTorch reference, launch configs, input checks.

``impl`` on every public function:

* ``"auto"``: Triton when the tensors are on an NVIDIA GPU of compute capability 8.0+ (``kernel_gpu``), or
  when ``TRITON_INTERPRET=1`` (CPU interpreter); otherwise the PyTorch reference.
* ``"triton"``: force Triton; raises if Triton is not importable or the tensors are on a device it
  cannot run on (CPU without ``TRITON_INTERPRET=1``).
* ``"reference"``: force the PyTorch reference (plain ops, autograd through PyTorch).

The kernels take float32, float16 and bfloat16; float64 inputs (``model.double()``, gradcheck) run on the
reference under ``"auto"`` and are refused by ``"triton"``. So are calls that want the gradient of an input a
kernel takes as fixed (``use_triton``'s ``fixed``: region_tokens' ``pos_embed``, the region loss's ``region_mask``).

Index checks (range, and distinct entries where the backward relies on them) cost one host sync per
call; set ``RMAE_KERNELS_CHECK_INDICES=0`` or call ``set_index_checks(False)`` to skip them (e.g. under
CUDA graphs).
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is Linux-only; the reference path must work without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "reference")


# Read once, at import: @triton.jit picks interpreter or compiled mode when the kernel modules are imported
# (right after this one), so a later change of the variable cannot change how they run.
def _triton_interprets() -> bool:
    """Triton's own reading of TRITON_INTERPRET (it takes 1, true, on, yes)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older Triton without knobs, or no Triton
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_INTERPRETING = HAS_TRITON and _triton_interprets()


def interpreting() -> bool:
    """True when the kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


_index_checks: bool | None = None  # set_index_checks(); None: the environment decides


def set_index_checks(enabled: bool | None) -> None:
    """Turn the index checks on or off in this process (``None``: back to ``RMAE_KERNELS_CHECK_INDICES``,
    default on). ``python -m rmae.train`` checks its first update, then turns them off: the indices come
    from the model's own masking, and on a GPU each check is a host sync."""
    global _index_checks
    _index_checks = enabled


def check_indices_enabled() -> bool:
    if _index_checks is not None:
        return _index_checks
    return os.environ.get("RMAE_KERNELS_CHECK_INDICES", "1") != "0"


def kernel_gpu(device: torch.device) -> bool:
    """Whether ``impl="auto"`` runs the kernels on this CUDA device: an NVIDIA GPU of compute capability 8.0 or
    newer (Ampere, Hopper: bfloat16 and tf32 dots), what they are written and tested for. Older cards and ROCm
    take the reference unless ``impl="triton"`` forces the kernels."""
    key = (device.index, getattr(torch.version, "hip", None))
    if key not in _KERNEL_GPUS:  # (once per device: use_triton runs on every call, also while torch.compile traces)
        _KERNEL_GPUS[key] = not key[1] and tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
    return _KERNEL_GPUS[key]


_KERNEL_GPUS: dict[tuple, bool] = {}


def use_triton(impl: str, *tensors: torch.Tensor | None,
               fixed: dict[str, tuple[torch.Tensor, str]] | None = None) -> bool:
    """Decide the implementation for a call; see the module docstring. ``fixed``: name -> (input, what it is) of the
    inputs the kernels take as constants, whose gradient they do not compute."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    ts = [t for t in tensors if t is not None]
    if any(t.dtype == torch.float64 for t in ts):
        if impl == "triton":
            raise RuntimeError("impl='triton' takes float32, float16 or bfloat16 tensors; float64 runs on the "
                               "reference (impl='auto' or 'reference')")
        return False
    on_cuda = bool(ts) and all(t.is_cuda for t in ts)
    if impl == "auto" and on_cuda and not interpreting() and not kernel_gpu(ts[0].device):
        return False
    runnable = HAS_TRITON and (on_cuda or interpreting())
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' but Triton is not importable on this platform")
        if not runnable:
            devs = sorted({str(t.device) for t in ts})
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (tensors on {devs})"
            )
        if not interpreting() and not on_cuda:  # pragma: no cover - guarded above
            raise RuntimeError("impl='triton': tensors must all be on the same CUDA device")
    elif not runnable:
        return False
    wanted = [(name, what) for name, (t, what) in (fixed or {}).items() if t.requires_grad and torch.is_grad_enabled()]
    if wanted and impl == "triton":
        raise ValueError(f"{wanted[0][0]} must not require grad in the Triton path (it is {wanted[0][1]}); "
                         "impl='auto' runs such calls on the reference")
    return not wanted


def is_compiling() -> bool:
    f = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(f()) if f is not None else False


def opaque_to_compile(fn):
    """Mark a Triton path as opaque to torch.compile (one graph break, run eagerly): its launchers
    make host-side checks and pick configs in Python, and the interpreter cannot be traced."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def pick_configs(configs):
    """Autotune configs: all of them on a GPU, only the first under the interpreter (no driver to time)."""
    return configs[:1] if interpreting() else configs


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the reference only


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_ndim(t: torch.Tensor, ndim: int, name: str, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(t.shape)}")


def check_index_tensor(ids: torch.Tensor, name: str, shape: tuple, shape_doc: str) -> None:
    """dtype int64 and exact shape."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {ids.dtype}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must be {shape_doc} = {tuple(shape)}, got {tuple(ids.shape)}")


def check_index_values(ids: torch.Tensor, upper: int, name: str, distinct: bool = False,
                       permutation: bool = False) -> None:
    """Every entry in [0, upper); optionally distinct per row, or a permutation of 0..upper-1 per row.

    One host sync. Skipped when ``RMAE_KERNELS_CHECK_INDICES=0``.
    """
    # is_compiling() first: under torch.compile the setting is then never read, so turning the checks off after
    # the first update (as rmae.train does) does not invalidate the compiled code (a recompile of every frame)
    if is_compiling() or not check_indices_enabled() or ids.numel() == 0:
        return
    bad_range = (ids < 0) | (ids >= upper)
    bad = bad_range.any()
    if distinct or permutation:
        s = ids.sort(dim=-1).values
        if permutation:
            ar = torch.arange(upper, device=ids.device, dtype=ids.dtype)
            bad = bad | (s != ar).any()
        else:
            bad = bad | (s[..., 1:] == s[..., :-1]).any()
    if bool(bad):
        if bool(bad_range.any()):
            lo, hi = int(ids.min()), int(ids.max())
            raise IndexError(f"{name} out of range: values must lie in [0, {upper}), got min {lo}, max {hi}")
        what = f"a permutation of 0..{upper - 1}" if permutation else "distinct"
        raise ValueError(f"every row of {name} must be {what} (the backward relies on it)")


def check_binary_maps(maps: torch.Tensor, name: str = "maps") -> None:
    """uint8 maps hold only 0 and 1: both paths take the byte's value itself (a 255 would be a BCE target of 255
    and a region-token pixel of 254.5), so a 0/255 mask is refused. One host sync, skipped with the index checks;
    bool needs none."""
    if maps.dtype == torch.bool or is_compiling() or not check_indices_enabled() or maps.numel() == 0:
        return
    top = int(maps.max())
    if top > 1:
        raise ValueError(f"{name} must be binary maps with values 0/1, got values up to {top} (for 0/255 "
                         f"masks pass maps != 0)")


def check_same_device(**tensors) -> None:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


# ---------------------------------------------------------------------------------------------------
# output allocation (with a test hook proving every element is written)
# ---------------------------------------------------------------------------------------------------
_POISON = [False]


@contextlib.contextmanager
def poison_outputs():
    """Test hook: inside this context, every buffer a launcher allocates starts as NaN instead of
    uninitialised memory, so an element a kernel fails to write shows up as NaN."""
    prev = _POISON[0]
    _POISON[0] = True
    try:
        yield
    finally:
        _POISON[0] = prev


def new_empty(shape, device, dtype) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled under :func:`poison_outputs`)."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if _POISON[0]:
        t.fill_(float("nan"))
    return t


def on_tensor_device(fn):
    """Launcher decorator: run on the CUDA device of the first tensor argument (Triton launches on the
    current device), so tensors on cuda:1 work while cuda:0 is current. No-op on CPU."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is not None and t.is_cuda:
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper

"""The Triton kernels compiled for a real GPU against their PyTorch references (CUDA only; skipped elsewhere).

tests/test_kernels.py checks the kernels through Triton's CPU interpreter; this file checks what the interpreter
cannot: the code the compiler generates for the card (tf32 / bf16 ``tl.dot``, autotuned configs, stores that
round to nearest). Run it on a GPU machine with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu.py

ViT-B shapes (N = 196 patches, L = 49 visible, k = 8 regions), batch 4, fresh random inputs; forward outputs and
the gradients of every differentiable input, the kernels' output buffers poisoned with NaN (an element a kernel
does not write fails). Tolerance, relative to the reference's largest magnitude (however small: the BCE
gradients are ~1e-6): 1e-4 in float32 (long reductions and tf32x3 dots round differently from PyTorch's), 2e-2
in bfloat16. The references run in true float32: TF32 is off for cuDNN's convolutions and cuBLAS's matmuls
(cuDNN's default TF32 alone puts the region-token weight gradient 2e-4 off).
"""
from __future__ import annotations

import os

import pytest
import torch

from rmae import kernels
from rmae.kernels._dispatch import poison_outputs

_UNAVAILABLE = not torch.cuda.is_available() or kernels.interpreting() or not kernels.HAS_TRITON
if _UNAVAILABLE and os.environ.get("RMAE_REQUIRE_GPU") == "1":  # benchmarks/gpu_check.sh: a skip is a failure there
    pytest.fail("RMAE_REQUIRE_GPU=1 but there is no CUDA GPU, no Triton, or TRITON_INTERPRET is on", pytrace=False)
pytestmark = pytest.mark.skipif(_UNAVAILABLE, reason="needs a CUDA GPU, Triton, and TRITON_INTERPRET unset or 0")

B, N, L, K, P = 4, 196, 49, 8, 16
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def true_float32_references():
    """The PyTorch references in float32 without TF32 (PyTorch lets cuDNN's convolutions use it by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device="cuda").to(dtype).requires_grad_(grad)


def _ids():
    shuffle = torch.rand(B, N, device="cuda").argsort(dim=1)
    return shuffle[:, :L].contiguous(), shuffle.argsort(dim=1)


def _labels(scales=3):
    cells = torch.randint(0, 12, (B, scales, 224 // 8, 224 // 8), device="cuda")
    return cells.repeat_interleave(8, 2).repeat_interleave(8, 3).to(torch.int16)


def _case(name, dtype):
    """(call(impl) -> outputs, inputs that require grad) of one public kernel."""
    ids_keep, ids_restore = _ids()
    if name == "gather_visible":
        x, regions = _randn(B, N, 768, dtype=dtype, grad=True), _randn(B, K, N, 128, dtype=dtype, grad=True)
        return lambda impl: kernels.gather_visible(x, ids_keep, regions, impl=impl), [x, regions]
    if name == "unshuffle_fill":
        x, token = _randn(B, L + 1, 512, dtype=dtype, grad=True), _randn(1, 1, 512, dtype=dtype, grad=True)
        pos = _randn(1, N + 1, 512)  # the model's fixed fp32 table
        return lambda impl: kernels.unshuffle_fill(x, token, ids_restore, pos, impl=impl), [x, token]
    if name == "region_query_pool":
        x, residual = _randn(B, K, L, 128, dtype=dtype, grad=True), _randn(B, K, L, 128, dtype=dtype, grad=True)
        return lambda impl: kernels.region_query_pool(x, residual, impl=impl), [x, residual]
    weight = (_randn(128, 1, P, P) * 0.05).to(dtype).requires_grad_(True)
    bias, pos = _randn(128, dtype=dtype, grad=True), _randn(1, N, 128, dtype=dtype)
    labels = _labels()
    scale_index = torch.randint(0, 3, (B, K), device="cuda")
    label_id = torch.randint(-1, 12, (B, K), device="cuda")  # -1: an empty region
    if name == "region_tokens":
        maps = kernels.labels_to_maps(labels, scale_index, label_id).to(torch.uint8)
        return lambda impl: kernels.region_tokens(maps, ids_keep, weight, bias, pos, P, impl=impl), [weight, bias]
    if name == "region_tokens_from_labels":
        return (lambda impl: kernels.region_tokens_from_labels(labels, scale_index, label_id, ids_keep, weight,
                                                               bias, pos, P, impl=impl), [weight, bias])
    logits = (_randn(B, K, N, P * P) * 3).to(dtype).requires_grad_(True)
    mask = (torch.rand(B, N, device="cuda") < 0.75).float()
    if name == "region_bce_loss":
        maps = kernels.labels_to_maps(labels, scale_index, label_id).to(torch.uint8)
        return lambda impl: kernels.region_bce_loss(logits, maps, mask, P, 0.5, impl=impl), [logits]
    assert name == "region_bce_loss_from_labels"
    return (lambda impl: kernels.region_bce_loss_from_labels(logits, labels, scale_index, label_id, mask, P, 0.5,
                                                             impl=impl), [logits])


def _outputs(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o is not None]


def _assert_close(got, expected, dtype, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(expected.detach().float().abs().max().item(), torch.finfo(torch.float32).tiny)
    error = (got.detach().float() - expected.detach().float()).abs().max().item() / scale
    assert error <= TOL[dtype], f"{what}: max error {error:.2e} of the reference's largest magnitude {scale:.2e}"


def _assert_close_in_norm(got, expected, tolerance, what):
    """‖got − expected‖ / ‖expected‖: for a whole model's gradients, where rounding differences spread."""
    error = (got.detach().float() - expected.detach().float()).norm() / expected.detach().float().norm()
    assert torch.isfinite(got).all() and error <= tolerance, f"{what}: relative error {error:.2e} in norm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gather_visible", "unshuffle_fill", "region_query_pool", "region_tokens",
                                  "region_tokens_from_labels", "region_bce_loss", "region_bce_loss_from_labels"])
def test_compiled_kernel_matches_reference_forward_and_backward(name, dtype):
    torch.manual_seed(0)
    call, inputs = _case(name, dtype)
    reference = _outputs(call("reference"))
    with poison_outputs():
        triton = _outputs(call("triton"))
    upstream = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in reference]
    for n, (a, b) in enumerate(zip(triton, reference)):
        _assert_close(a, b, dtype, f"{name} output {n}")
    with poison_outputs():
        grads_triton = torch.autograd.grad(triton, inputs, upstream)
    grads_reference = torch.autograd.grad(reference, inputs, upstream)
    for n, (a, b) in enumerate(zip(grads_triton, grads_reference)):
        _assert_close(a, b, dtype, f"{name} gradient {n}")


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_model_on_the_gpu_kernels_matches_the_reference_path(amp):
    """A small R-MAE (regions as labels, the trainer's path) with the Triton kernels and with plain PyTorch: the
    same loss and gradients on the same weights and masks, in fp32 and under bf16 autocast."""
    from rmae.models import RegionLabels, build_model

    torch.manual_seed(0)
    models = {impl: build_model("rmae_small_patch16", "rmae", kernel_impl=impl).cuda()
              for impl in ("triton", "reference")}
    models["reference"].load_state_dict(models["triton"].state_dict())
    images = torch.randn(B, 3, 224, 224, device="cuda")
    regions = RegionLabels(_labels(), torch.randint(0, 3, (B, K), device="cuda"),
                           torch.randint(0, 12, (B, K), device="cuda"))
    noise = torch.rand(B, N, device="cuda")
    results = {}
    for impl, model in models.items():
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            out = model(images, regions, noise=noise)
        out.loss.backward()
        results[impl] = (out.loss.detach(), model.region_patch_embed.proj.weight.grad,
                         model.blocks[0].attn.qkv.weight.grad)
    tolerance = 3e-2 if amp is not None else 1e-4  # bf16: both paths round, differently, through the network
    for n, (a, b) in enumerate(zip(results["triton"], results["reference"])):
        _assert_close_in_norm(a, b, tolerance, f"loss and gradients, item {n}")

"""rmae.kernels benchmark: each Triton kernel vs its PyTorch reference, eager and torch.compile'd.

Times forward (grad enabled, as in training) and forward+backward of every op at the ViT-B / k=8 / batch 64
shapes on CUDA (N=196, L=49, C=768 image tokens, 128-d regions, 224 px maps, 512-d / 128-d decoder
sequences). On a CPU-only machine Triton would be its interpreter, so only the reference (eager and
compiled) runs, at a reduced batch; the script is otherwise the same and runs unchanged on a GPU.

Achieved bandwidth counts the bytes each op *must* move (its inputs' needed elements read once, its
outputs written once; see ``BYTES`` in each case), so the reference, which moves more, gets the same
numerator. On a GPU it is also shown as % of the card's peak (spec table by name, and a measured
large device copy).

    python benchmarks/bench_kernels.py                      # defaults for the machine
    python benchmarks/bench_kernels.py --batch 8 --reps 5 --kernels gather_visible,region_tokens
Writes ``<out>/kernels.json`` and ``<out>/kernels.md`` (default ``benchmarks/out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from rmae import kernels
from common import cpu_model, round_robin, write_report
from rmae.cores import usable_cores

# peak DRAM bandwidth, TB/s, by a substring of torch.cuda.get_device_name()
PEAK_TBPS = [
    ("GH200", 4.0),  # before "H200", which it contains
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("A10G", 0.6),
    ("RTX 4090", 1.008),
]


# ---------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores_visible": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": getattr(__import__("triton"), "__version__", None) if kernels.HAS_TRITON else None,
        "device": str(device),
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        info["cuda"] = torch.version.cuda
        info["peak_TBps_spec"] = next((v for k, v in PEAK_TBPS if k in name), None)
        info["copy_TBps_measured"] = measure_copy_bandwidth(device)
    return info


def measure_copy_bandwidth(device) -> float:
    """Large device-to-device copy (read + write bytes) in TB/s."""
    n = 1 << 28  # 256 Mi floats = 1 GiB
    a = torch.empty(n, device=device, dtype=torch.float32)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, warmup=3, reps=20)
    return 2 * n * 4 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def time_ms(fn, device, warmup: int, reps: int) -> float:
    """Median milliseconds per call of one function (the device copy's measurement)."""
    return time_together([fn], device, warmup, reps)[0]


def time_together(fns: list, device, warmup: int, reps: int, rounds: int = 5) -> list[float]:
    """Median milliseconds per call of each function, timed round-robin (all warmed up first), so that the
    machine's drift and other jobs touch every implementation alike. CPU: ``reps`` rounds of one call each.
    CUDA: ``rounds`` rounds of triton.testing.do_bench (L2 flushed between calls, about ``max(reps, 20) * 5``
    ms of calls per function in all), the median of the rounds' medians."""
    if device.type == "cuda":
        import triton.testing

        for fn in fns:
            triton.testing.do_bench(fn, warmup=max(warmup, 5) * 5, rep=1)
        per_round = max(max(reps, 20) * 5 // rounds, 1)
        times = [[] for _ in fns]
        for _ in range(rounds):
            for fn, timed in zip(fns, times):
                timed.append(float(triton.testing.do_bench(fn, warmup=0, rep=per_round, return_mode="median")))
        return [statistics.median(timed) for timed in times]
    for fn in fns:
        for _ in range(warmup):
            fn()
    return [statistics.median(timed) * 1e3 for timed in round_robin(fns, reps)]


def kernel_ms(fn, device, reps: int = 20) -> float | None:
    """CUDA: milliseconds per call of GPU work alone (the kernels and copies ``fn`` launches, summed by
    torch.profiler), without the host's launch overhead and the idle gaps it leaves: at these sizes a kernel
    moves its bytes in microseconds, so the wall-clock time of a call is mostly Python. None on CPU, or when the
    profiler gives no device times (said once)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize(device)
        events = prof.key_averages()
        # the kernels' own entries (a CPU op's entry would count its kernels' time a second time), where the
        # profiler labels them
        kernels_only = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        total_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in kernels_only or events)
    except Exception as error:  # a profiler that does not run here: the wall-clock columns stay
        print(f"  (no kernel times: {type(error).__name__}: {error})", flush=True)
        return None
    return total_us / reps / 1e3 if total_us > 0 else None


# ---------------------------------------------------------------------------------------------------
# cases: each returns (name, shape string, make() -> (fn(impl) -> outputs, grad inputs, out grads), bytes)
# ---------------------------------------------------------------------------------------------------
def esize(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def case_gather_visible(B, k, dt, dev, g):
    N, L, C, Cr = 196, 49, 768, 128
    x = torch.randn(B, N, C, device=dev, dtype=dt, requires_grad=True)
    r = torch.randn(B, k, N, Cr, device=dev, dtype=dt, requires_grad=True)
    ids = torch.rand(B, N, generator=g).argsort(1)[:, :L].to(dev)
    e = esize(dt)

    fn = lambda impl: kernels.gather_visible(x, ids, r, impl=impl)  # noqa: E731

    fwd_bytes = 2 * (B * L * C + B * k * L * Cr) * e + B * L * 8
    bwd_bytes = (B * L * C + B * k * L * Cr) * e + (B * N * C + B * k * N * Cr) * e + B * L * 8
    ref = lambda: kernels.gather_visible_reference(x, ids, r)  # noqa: E731
    return dict(name="gather_visible", shape=f"x[{B},{N},{C}] regions[{B},{k},{N},{Cr}] L={L}",
                fn=fn, ref=ref, inputs=[x, r], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def case_unshuffle(B, k, dt, dev, g, C=512, label="pixel decoder"):
    N, L = 196, 49
    x = torch.randn(B, L + 1, C, device=dev, dtype=dt, requires_grad=True)
    # as in the model under autocast: bf16 activations, fp32 mask token and fixed fp32 position buffer
    m = torch.randn(1, 1, C, device=dev, dtype=torch.float32, requires_grad=True)
    pos = torch.randn(1, N + 1, C, device=dev, dtype=torch.float32)
    ids_restore = torch.rand(B, N, generator=g).argsort(1).argsort(1).to(dev)
    e = esize(dt)
    eo = esize(torch.promote_types(dt, torch.float32))
    fn = lambda impl: kernels.unshuffle_fill(x, m, ids_restore, pos, impl=impl)  # noqa: E731
    ref = lambda: kernels.unshuffle_fill_reference(x, m, ids_restore, pos)  # noqa: E731
    fwd_bytes = B * (L + 1) * C * e + (C + (N + 1) * C) * 4 + B * (N + 1) * C * eo + B * N * 8
    bwd_bytes = B * (N + 1) * C * eo + B * (L + 1) * C * e + C * 4 + B * N * 8
    return dict(name=f"unshuffle_fill ({label})", shape=f"x[{B},{L + 1},{C}] -> [{B},{N + 1},{C}]",
                fn=fn, ref=ref, inputs=[x, m], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def case_pool(B, k, dt, dev, g):
    L, C = 49, 128
    x = torch.randn(B, k, L, C, device=dev, dtype=dt, requires_grad=True)
    res = torch.randn(B, k, L, C, device=dev, dtype=dt, requires_grad=True)
    e = esize(dt)
    fn = lambda impl: kernels.region_query_pool(x, res, impl=impl)  # noqa: E731
    ref = lambda: kernels.region_query_pool_reference(x, res)  # noqa: E731
    fwd_bytes = (2 * B * k * L * C + B * k * C) * e
    bwd_bytes = (B * k * C + 2 * B * k * L * C) * e
    return dict(name="region_query_pool (+residual)", shape=f"[{B},{k},{L},{C}] x2 -> [{B},{k},{C}]",
                fn=fn, ref=ref, inputs=[x, res], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def _region_params(dev, D=128, P=16, N=196):
    """fp32 parameters and position table, as in the model (autocast does not cast custom Functions)."""
    w = (torch.randn(D, 1, P, P, device=dev) * 0.02).requires_grad_(True)
    b = torch.zeros(D, device=dev, requires_grad=True)
    pos = torch.randn(1, N, D, device=dev)
    return w, b, pos


def case_region_tokens(B, k, dt, dev, g):
    P, H, L, D = 16, 224, 49, 128
    N = (H // P) ** 2
    maps = (torch.rand(B, k, H, H, generator=g) < 0.3).to(torch.uint8).to(dev)
    ids = torch.rand(B, N, generator=g).argsort(1)[:, :L].to(dev)
    w, b, pos = _region_params(dev, D, P, N)
    e = 4  # fp32 weights and output
    fn = lambda impl: kernels.region_tokens(maps, ids, w, b, pos, P, impl=impl)  # noqa: E731
    ref = lambda: kernels.region_tokens_reference(maps, ids, w, b, pos, P)  # noqa: E731
    pix = B * k * L * P * P  # uint8 pixels of the visible patches
    fwd_bytes = pix + B * L * 8 + (D * P * P + D + N * D) * e + B * k * L * D * e
    bwd_bytes = B * k * L * D * e + pix + B * L * 8 + (D * P * P + D) * e
    return dict(name="region_tokens (uint8 maps)", shape=f"maps[{B},{k},{H},{H}] -> [{B},{k},{L},{D}]",
                fn=fn, ref=ref, inputs=[w, b], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def case_region_tokens_labels(B, k, dt, dev, g):
    P, H, L, D, S = 16, 224, 49, 128, 3
    N = (H // P) ** 2
    coarse = torch.randint(0, 40, (B, S, H // 8, H // 8), generator=g)
    labels = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3).to(torch.int16).to(dev)
    si = torch.randint(0, S, (B, k), generator=g).to(dev)
    li = torch.randint(0, 40, (B, k), generator=g).to(dev)
    ids = torch.rand(B, N, generator=g).argsort(1)[:, :L].to(dev)
    w, b, pos = _region_params(dev, D, P, N)
    e = 4  # fp32 weights and output
    fn = lambda impl: kernels.region_tokens_from_labels(labels, si, li, ids, w, b, pos, P, impl=impl)  # noqa
    ref = lambda: kernels.region_tokens_from_labels_reference(labels, si, li, ids, w, b, pos, P)  # noqa
    pix = B * min(S, k) * L * P * P * 2  # int16 labels of the visible patches, once per scale plane used
    fwd_bytes = pix + B * L * 8 + 2 * B * k * 8 + (D * P * P + D + N * D) * e + B * k * L * D * e
    bwd_bytes = B * k * L * D * e + pix + B * L * 8 + 2 * B * k * 8 + (D * P * P + D) * e
    return dict(name="region_tokens_from_labels (int16, S=3)",
                shape=f"labels[{B},{S},{H},{H}] -> [{B},{k},{L},{D}]",
                fn=fn, ref=ref, inputs=[w, b], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def case_region_bce(B, k, dt, dev, g):
    P, H = 16, 224
    N = (H // P) ** 2
    maps = (torch.rand(B, k, H, H, generator=g) < 0.3).to(torch.uint8).to(dev)
    logits = torch.randn(B, k, N, P * P, device=dev, dtype=dt, requires_grad=True)
    mask = (torch.rand(B, N, generator=g) < 0.75).float().to(dev)
    e = esize(dt)
    fn = lambda impl: kernels.region_bce_loss(logits, maps, mask, P, 1.0, impl=impl)  # noqa: E731
    ref = lambda: kernels.region_bce_loss_reference(logits, maps, mask, P, 1.0)  # noqa: E731
    n_el = B * k * N * P * P
    fwd_bytes = n_el * e + n_el + B * N * 4  # logits, uint8 maps, mask
    bwd_bytes = n_el * e + n_el + B * N * 4 + n_el * e  # re-read both, write d(logits)
    return dict(name="region_bce_loss (uint8 maps)", shape=f"logits[{B},{k},{N},{P * P}]",
                fn=fn, ref=ref, inputs=[logits], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


CASES = {
    "gather_visible": case_gather_visible,
    "unshuffle_fill": case_unshuffle,
    "unshuffle_fill_region": lambda B, k, dt, dev, g: case_unshuffle(B, k, dt, dev, g, C=128,
                                                                    label="region neck"),
    "region_query_pool": case_pool,
    "region_tokens": case_region_tokens,
    "region_tokens_from_labels": case_region_tokens_labels,
    "region_bce_loss": case_region_bce,
}


def as_list(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o is not None]


def fwd_bwd(fwd, inputs):
    outs = as_list(fwd())
    grads = [torch.ones_like(o) for o in outs]
    torch.autograd.grad(outs, inputs, grads)


def check_triton(c) -> float:
    """Max |triton - reference| / max|reference| over the outputs and the input gradients (same grads)."""
    def run(fwd):
        outs = as_list(fwd())
        gouts = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
        return outs, gouts

    torch.manual_seed(0)
    ref_outs, gouts = run(c["ref"])
    ref_grads = torch.autograd.grad(ref_outs, c["inputs"], gouts)
    tri_outs = as_list(c["fn"]("triton"))
    tri_grads = torch.autograd.grad(tri_outs, c["inputs"], gouts)
    err = 0.0
    for a, b in zip(list(tri_outs) + list(tri_grads), list(ref_outs) + list(ref_grads)):
        scale = b.detach().float().abs().max().clamp_min(1e-12)
        err = max(err, ((a.detach().float() - b.detach().float()).abs().max() / scale).item())
    return err


def run_case(c, variants, device, warmup, reps):
    err = check_triton(c) if "triton" in variants else None  # with the index checks, as a user's call
    if err is not None:
        print(f"  triton vs reference: max relative error {err:.2e}", flush=True)
    # Timed without the index checks (a host sync and extra launches per call that the reference rows do not
    # pay), as the trainer runs after its first update.
    kernels.set_index_checks(False)
    try:
        return _timed_rows(c, variants, device, warmup, reps, err)
    finally:
        kernels.set_index_checks(None)


def _timed_rows(c, variants, device, warmup, reps, err):
    fwds, first = [], []
    for variant in variants:
        if variant == "triton":
            fwd = lambda: c["fn"]("triton")  # noqa: E731
        elif variant == "reference eager":
            fwd = c["ref"]
        else:  # reference compiled
            fwd = torch.compile(c["ref"], dynamic=False)
        t_c = time.perf_counter()
        fwd_bwd(fwd, c["inputs"])  # first call: compile / autotune
        first.append(time.perf_counter() - t_c)
        fwds.append(fwd)
    # each direction timed with the implementations interleaved
    t_fwd = time_together(fwds, device, warmup, reps)
    t_fwd_bwd = time_together([lambda fwd=fwd: fwd_bwd(fwd, c["inputs"]) for fwd in fwds], device, warmup, reps)
    rows = []
    for variant, fwd, first_s, t_f, t_fb in zip(variants, fwds, first, t_fwd, t_fwd_bwd):
        t_gpu = kernel_ms(lambda: fwd_bwd(fwd, c["inputs"]), device)
        gpu_GBps = (c["fwd_bytes"] + c["bwd_bytes"]) / (t_gpu * 1e-3) / 1e9 if t_gpu else None
        rows.append(dict(kernel=c["name"], shape=c["shape"], impl=variant, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                         fwd_bwd_kernel_ms=t_gpu, fwd_bwd_kernel_GBps=gpu_GBps,
                         fwd_GBps=c["fwd_bytes"] / (t_f * 1e-3) / 1e9,
                         fwd_bwd_GBps=(c["fwd_bytes"] + c["bwd_bytes"]) / (t_fb * 1e-3) / 1e9,
                         fwd_bytes=c["fwd_bytes"], bwd_bytes=c["bwd_bytes"], first_call_s=first_s,
                         triton_max_rel_err=err))
        print(f"  {variant:20s} fwd {t_f:9.3f} ms  fwd+bwd {t_fb:9.3f} ms  "
              f"({rows[-1]['fwd_bwd_GBps']:.3g} GB/s)  first call {first_s:.1f} s", flush=True)
    return rows


def markdown(info, rows, args) -> str:
    gpu = info.get("gpu")
    peak = info.get("peak_TBps_spec")
    copy = info.get("copy_TBps_measured")
    lines = []
    if gpu:
        lines.append(f"Machine: {gpu} (peak {peak} TB/s spec, {copy:.2f} TB/s measured copy), "
                     f"CPU {info['cpu']}, torch {info['torch']}, triton {info['triton']}.")
    else:
        interpreted = any(r["impl"] == "triton" for r in rows)
        lines.append(f"Machine: {info['cpu']}, {info['cpu_cores_visible']} usable cores, "
                     f"{info['torch_threads']} torch threads, torch {info['torch']}, no GPU. "
                     "Triton needs a GPU, so this run times the PyTorch reference"
                     + (" eager" if args.no_compile else " eager vs torch.compile")
                     + (" (the triton rows run Triton's CPU interpreter: a smoke run, not a speed)." if interpreted
                        else "."))
    timing = ("median of 5 rounds of triton.testing.do_bench (about "
              f"{max(args.reps, 20) * 5} ms of calls per op in all, L2 flushed)" if gpu else f"median of {args.reps} reps")
    timing += ", the implementations of an op interleaved round by round"
    lines.append(f"Batch {args.batch}, k={args.k}, dtype {args.dtype}; {timing}; Triton timed without index checks; "
                 "GB/s = bytes the op must move / time (forward, and forward+backward together).")
    lines.append("")
    head = "| kernel | shape | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |"
    sep = "|---|---|---|---:|---:|---:|---:|"
    if gpu and peak:
        head += " fwd+bwd % peak |"
        sep += "---:|"
    head += " fwd+bwd vs ref eager |"
    sep += "---:|"
    kernel_times = any(r.get("fwd_bwd_kernel_ms") for r in rows)
    if kernel_times:
        head += " fwd+bwd GPU-only ms | GPU-only GB/s |" + (" GPU-only % peak |" if peak else "")
        sep += "---:|---:|" + ("---:|" if peak else "")
        lines[-2] += (" GPU-only: the kernels' own time per call (torch.profiler), without the host's launch "
                      "overhead, which the wall-clock columns include.")
    lines += [head, sep]
    base = {r["kernel"]: r["fwd_bwd_ms"] for r in rows if r["impl"] == "reference eager"}
    for r in rows:
        line = (f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['fwd_ms']:.3g} | {r['fwd_GBps']:.3g} | "
                f"{r['fwd_bwd_ms']:.3g} | {r['fwd_bwd_GBps']:.3g} |")
        if gpu and peak:
            line += f" {100 * r['fwd_bwd_GBps'] / (peak * 1e3):.1f}% |"
        b = base.get(r["kernel"])
        line += f" {b / r['fwd_bwd_ms']:.2f}x |" if b else " |"
        if kernel_times:
            ms, gbps = r.get("fwd_bwd_kernel_ms"), r.get("fwd_bwd_kernel_GBps")
            line += f" {ms:.3g} | {gbps:.3g} |" if ms else " | |"
            if peak:
                line += f" {100 * gbps / (peak * 1e3):.1f}% |" if ms else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="activation dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--kernels", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: shared small machines make OpenMP spin)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (64 if cuda else 8)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.reps = args.reps or (50 if cuda else 5)
    args.warmup = args.warmup or (10 if cuda else 2)
    dt = getattr(torch, args.dtype)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    info = machine_info(device)
    print("machine:", json.dumps(info))

    variants = ["reference eager"] + ([] if args.no_compile else ["reference compiled"])
    triton_ok = kernels.HAS_TRITON and (cuda or kernels.interpreting())
    if triton_ok:
        variants.append("triton")
        if not cuda:
            print("note: TRITON_INTERPRET=1 — the 'triton' rows time the CPU interpreter (a smoke run only).")
    elif not cuda:
        print("note: no GPU — Triton runs only through its CPU interpreter; timing the reference only.")

    rows, failures, md = [], [], markdown(info, [], args)
    for name in [s for s in args.kernels.split(",") if s]:
        g = torch.Generator().manual_seed(0)
        c = CASES[name](args.batch, args.k, dt, device, g)
        print(f"{c['name']}: {c['shape']}", flush=True)
        try:
            rows += run_case(c, variants, device, args.warmup, args.reps)
        except Exception as e:  # one kernel's failure (a compile error on the card, say) is recorded; the rest run
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"  FAILED: {failures[-1]}", flush=True)
        del c
        if cuda:
            torch.cuda.empty_cache()
        # written after every kernel: a run stopped by a time limit keeps the rows it has
        md = markdown(info, rows, args) + numerics_summary(rows, args.dtype) + "".join(
            f"\nFAILED {f}\n" for f in failures)
        write_report(Path(args.out) / "kernels", dict(machine=info, args=vars(args), rows=rows, failures=failures), md)
    print()
    print(md)
    return 1 if "OUTSIDE tolerance" in md or failures else 0


# Max |triton - reference| / max|reference| over outputs and input gradients that we accept at benchmark
# shapes: looser than the unit tests' (small shapes) because long reductions round differently.
NUMERICS_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def numerics_summary(rows, dtype: str) -> str:
    """One line on the Triton-vs-reference check that ran before the timings (nothing when no Triton row)."""
    errs = {r["kernel"]: r["triton_max_rel_err"] for r in rows
            if r["impl"] == "triton" and r.get("triton_max_rel_err") is not None}
    if not errs:
        return ""
    tol = NUMERICS_TOLERANCE[dtype]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    worst = max(errs.values())
    if bad:
        listed = ", ".join(f"{k} {e:.2e}" for k, e in bad.items())
        return f"\nNumerics: OUTSIDE tolerance {tol:g} ({dtype}): {listed}. Investigate before trusting the timings.\n"
    return f"\nNumerics: Triton vs reference (outputs and gradients) within {tol:g} ({dtype}); worst {worst:.2e}.\n"


if __name__ == "__main__":
    sys.exit(main())

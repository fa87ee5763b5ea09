"""Model step benchmark: forward + backward time of one training step (no optimizer).

Compares, in the same run and interleaved round-robin (so machine noise hits every row alike):

* MAE (num_region=0) vs R-MAE (k regions), both ``kernel_impl="auto"``  -> cost of the region branch;
* R-MAE ``kernel_impl="auto"`` (rmae.kernels, optionally torch.compile) vs the same weights with
  ``kernel_impl="reference"`` in eager PyTorch -> speed-up of our fused path.

CPU default: rmae_tiny_patch16, batch 8, 224 px, fp32. CUDA default: rmae_base_patch16 (ViT-B/16), batch 64,
224 px, bf16 autocast. Also counts FLOPs (torch.utils.flop_counter, forward + backward) for MAE vs R-MAE.
Writes JSON and a markdown table (default ``benchmarks/out/model.{json,md}``).

    python benchmarks/bench_model.py                  # defaults for the machine
    python benchmarks/bench_model.py --arch rmae_small_patch16 --batch 8 --steps 5
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from rmae.models import RegionLabels, build_model
from rmae import kernels
from common import machine, round_robin, write_report


def make_inputs(batch, img, k, device, regions_as, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img, img, generator=g)
    S = 3  # COCO recipe: 3 FH scales
    coarse = torch.randint(0, 40, (batch, S, img // 8, img // 8), generator=g)
    labels = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3).to(torch.int32)
    scale_index = torch.randint(0, S, (batch, k), generator=g)
    label_id = torch.randint(0, 40, (batch, k), generator=g)
    rl = RegionLabels(labels, scale_index, label_id)
    regions = rl if regions_as == "labels" else rl.to_maps().to(torch.uint8)
    regions = regions.to(device)
    noise = torch.rand(batch, (img // 16) ** 2, generator=g)
    return images.to(device), regions, noise


def step_fn(model, images, regions, amp_dtype):
    def step():
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images, regions)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops(model, images, regions, amp_dtype):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(model, images, regions, amp_dtype)()
    return counter.get_total_flops()


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="rmae_base_patch16" if cuda else "rmae_tiny_patch16")
    ap.add_argument("--batch", type=int, default=64 if cuda else 8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--regions", choices=["maps", "labels"], default="maps")
    ap.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16" if cuda else "none")
    ap.add_argument("--compile", action="store_true", help="torch.compile the kernel_impl='auto' models")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20 if cuda else 5)
    ap.add_argument("--flops-only", action="store_true", help="only count FLOPs (MAE vs R-MAE), no timing")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default="benchmarks/out/model")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if cuda else "cpu")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    torch.manual_seed(0)
    common = dict(img_size=args.img)
    rmae_auto = build_model(args.arch, "rmae", num_region=args.k, kernel_impl="auto", **common).to(device)
    rmae_ref = build_model(args.arch, "rmae", num_region=args.k, kernel_impl="reference", **common).to(device)
    rmae_ref.load_state_dict(rmae_auto.state_dict())
    mae_auto = build_model(args.arch, "mae", kernel_impl="auto", **common).to(device)
    mae_auto.load_state_dict(rmae_auto.state_dict(), strict=False)
    images, regions, _ = make_inputs(args.batch, args.img, args.k, device, args.regions)
    if args.flops_only:
        f_mae, f_rmae = flops(mae_auto, images, None, amp), flops(rmae_ref, images, regions, amp)
        line = (f"`{args.arch}`, batch {args.batch}, {args.img} px, k={args.k}: forward+backward GFLOP MAE "
                f"{f_mae / 1e9:.1f}, R-MAE {f_rmae / 1e9:.1f}, ratio {f_rmae / f_mae:.3f} (torch.utils.flop_counter: "
                f"matmuls and convolutions; attention only where the counter knows the device's attention kernel: "
                f"not on CPU, where it is about 4% of MAE's FLOPs)")
        result = {"machine": machine(), "arch": args.arch, "batch": args.batch, "img": args.img, "k": args.k,
                  "flops_mae": f_mae, "flops_rmae": f_rmae, "ratio": f_rmae / f_mae}
        table = f"Machine: {result['machine']}.\n\n{line}"
        print(table)
        write_report(f"{args.out}_flops", result, table)
        return result

    rows = {
        "MAE (auto)": step_fn(torch.compile(mae_auto) if args.compile else mae_auto, images, None, amp),
        f"R-MAE k={args.k} (auto{', compiled' if args.compile else ''})":
            step_fn(torch.compile(rmae_auto) if args.compile else rmae_auto, images, regions, amp),
        f"R-MAE k={args.k} (reference, eager)": step_fn(rmae_ref, images, regions, amp),
    }
    names = list(rows)
    # as rmae.train after its first update: no index checks (host syncs) in the timed steps; off before the
    # warm-up, since a compiled reference path guards on the setting and would compile again after a change
    kernels.set_index_checks(False)
    for name in names:  # warm-up (compilation, autotuning, allocator)
        for _ in range(args.warmup):
            rows[name]()
    sync(device)
    times = dict(zip(names, round_robin([rows[name] for name in names], args.steps, lambda: sync(device))))
    kernels.set_index_checks(None)
    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    f_mae = flops(mae_auto, images, None, amp)
    f_rmae = flops(rmae_ref, images, regions, amp)

    mae_n, auto_n, ref_n = names
    result = {
        "machine": machine(), "device": device.type, "arch": args.arch, "batch": args.batch, "img": args.img,
        "k": args.k, "regions": args.regions, "amp": args.amp, "compile": args.compile, "steps": args.steps,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "median_s": med, "min_s": best, "all_s": times, "loadavg_1min_end": load,
        "ratio_rmae_over_mae": med[auto_n] / med[mae_n],
        "speedup_auto_over_reference": med[ref_n] / med[auto_n],
        "flops_fwd_bwd": {"MAE": f_mae, f"R-MAE k={args.k}": f_rmae},
        "flop_ratio_rmae_over_mae": f_rmae / f_mae,
    }
    lines = [
        f"Machine: {result['machine']}. `{args.arch}`, batch {args.batch}, {args.img} px, "
        f"amp {args.amp}, regions as {args.regions}, median of {args.steps} interleaved forward+backward steps.",
        "",
        "| model | median step (ms) | min step (ms) | median vs MAE | GFLOP fwd+bwd |",
        "|---|---:|---:|---:|---:|",
        *[f"| {n} | {med[n] * 1e3:.1f} | {best[n] * 1e3:.1f} | {med[n] / med[mae_n]:.2f} | "
          f"{(f_mae if n == mae_n else f_rmae) / 1e9:.1f} |" for n in names],
        "",
        f"R-MAE / MAE step time: {result['ratio_rmae_over_mae']:.2f}x (FLOP ratio "
        f"{result['flop_ratio_rmae_over_mae']:.2f}x). R-MAE auto vs reference eager: "
        f"{result['speedup_auto_over_reference']:.2f}x speed-up ('auto' runs Triton on CUDA or under "
        f"TRITON_INTERPRET=1, else the PyTorch reference; here: "
        f"{'Triton' if kernels.use_triton('auto', images) else 'reference'}). 1-min load average at the end: "
        f"{load:.1f} on {os.cpu_count()} cores" + (" (machine busy: timings are noisy)" if load > (os.cpu_count() or 1)
                                                  else "") + ".",
    ]
    table = "\n".join(lines)
    print(table)
    write_report(args.out, result, table)
    return result


if __name__ == "__main__":
    main()

"""Training-step throughput: MAE vs R-MAE, eager vs torch.compile, fp32 vs bf16 autocast.

One step = forward + backward + AdamW update on a synthetic batch (random normalised images, FH-like label
maps with k regions), exactly what ``rmae.train`` runs per micro-batch, without the data loader (and, as it
does after its first update, without the kernels' index checks). Reports
images/s and step time; on CUDA also MFU = analytic model FLOPs/s divided by the card's dense bf16 spec peak
(H100 SXM 989 TFLOP/s, the usual definition; the issue's goal is on this one), and next to it the share of
the bf16 matmul peak measured in the same run. The models of one compile mode and dtype (MAE and R-MAE) are
timed together, their steps round-robin after each one's warm-up, so that "step vs MAE's" compares steps taken
side by side. The reference in the "vs" column is the first row of the same model (in the first compile mode and
dtype asked for).

    python benchmarks/bench_train.py                       # CPU: tiny arch, 96 px, batch 16
    python benchmarks/bench_train.py --arch rmae_base_patch16 --img-size 224 --batch 128   # GPU default
Writes ``benchmarks/out/bench_train.json`` and ``.md`` and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rmae import kernels
from rmae.models import RegionLabels, build_model
from common import machine as describe_machine, round_robin, write_report


# ----------------------------------------------------------------------------------------------------------------
# FLOPs (multiply-add = 2 FLOPs), forward; a training step is counted as 3x forward
# ----------------------------------------------------------------------------------------------------------------
def _blocks(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    linear = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, fc1, fc2
    attn = 2 * 2 * tokens * tokens * dim                       # q k^T and attn v
    return depth * (linear + attn)


def forward_flops_per_image(model, mask_ratio: float = 0.75) -> float:
    p = model.patch_size
    N = model.num_patches
    L = int(N * (1 - mask_ratio))
    D = model.patch_embed.proj.out_channels
    f = 2 * N * 3 * p * p * D                                    # patch embed (all patches)
    f += _blocks(L + 1, D, len(model.blocks))
    if model.use_mae_loss:
        Dd = model.decoder_embed.out_features
        f += 2 * (L + 1) * D * Dd + _blocks(N + 1, Dd, len(model.decoder_blocks)) + 2 * N * Dd * 3 * p * p
    k = model.num_region
    if k > 0:
        Lr = int(N * (1 - model.region_mask_ratio))
        De = model.region_patch_embed.proj.out_channels
        f += k * 2 * Lr * p * p * De                             # region token embed (visible patches)
        f += k * _blocks(Lr, De, len(model.region_enc_blocks))  # region encoder, shared over regions
        Cd = model.region_cross_embed.out_features
        f += 2 * (L + 1) * D * Cd + _blocks(N + 1, Cd, len(model.region_cross_blocks))  # neck
        f += 2 * (N + 1) * Cd * Cd                               # W . memory (once, broadcast over regions)
        hidden = model.region_dec_blocks[-1].mlp.fc1.out_features  # the expansion MLP's (128 in ViT-B)
        f += k * (N + 1) * 2 * (2 * Cd * hidden + Cd * p * p)    # expansion MLP + prediction
    return float(f)


# ----------------------------------------------------------------------------------------------------------------
def synthetic_batch(model, batch: int, device, scales: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = model.img_size
    images = torch.randn(batch, 3, S, S, generator=g)
    regions = None
    if model.num_region > 0:
        # blocky label maps (8x8 px cells, 12 labels per scale) like FH segments of a crop
        cells = torch.randint(0, 12, (batch, scales, S // 8, S // 8), generator=g)
        labels = cells.repeat_interleave(8, 2).repeat_interleave(8, 3).to(torch.int16)
        k = model.num_region
        regions = RegionLabels(labels, torch.randint(0, scales, (batch, k), generator=g),
                               torch.randint(0, 12, (batch, k), generator=g)).to(device)
    return images.to(device), regions


# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
SPEC_PEAK_BF16 = [("GH200", 989.4e12), ("H200 NVL", 835.0e12), ("H200", 989.4e12), ("H100 PCIe", 756.0e12),
                  ("H100 NVL", 835.0e12), ("H100", 989.4e12), ("A100", 312.0e12)]


def spec_peak_bf16(device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in SPEC_PEAK_BF16 if key in name), None)


def peak_bf16_matmul(device, n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(10):  # clocks up before timing
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


class Config:
    """One benchmarked configuration: its model, optimizer and synthetic batch, built on the device, and its step."""

    def __init__(self, variant, arch, img_size, batch, device, dtype, compiled, kernel_impl):
        self.variant, self.arch, self.img_size, self.batch = variant, arch, img_size, batch
        self.device, self.dtype, self.compiled = device, dtype, compiled
        allocated = (lambda: torch.cuda.memory_allocated(device)) if device.type == "cuda" else (lambda: 0)
        before = allocated()
        torch.manual_seed(0)
        kw = dict(img_size=img_size, kernel_impl=kernel_impl, norm_pix_loss=True)
        if variant == "mae":
            kw["num_region"] = 0
        self.model = build_model(arch, variant=variant, **kw).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                     fused=device.type == "cuda" or None)
        if compiled:
            self.model.compile()
        self.images, self.regions = synthetic_batch(self.model, batch, device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast(
            device.type, enabled=False)
        self.own_bytes = allocated() - before  # its weights and batch (its optimizer state comes with its first step)
        self.loss = None

    def step(self) -> None:
        noise = torch.rand(self.batch, self.model.num_patches, device=self.device)
        with self.amp:
            out = self.model(self.images, self.regions, noise=noise, mask_ratio=0.75)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = out.loss


def bench_together(configs: list[Config], steps: int, warmup: int) -> list[dict]:
    """Warms each configuration up in turn (compilation, autotuning; its peak memory, less what the configurations
    before it keep resident), then times their steps round-robin, so that the machine's drift and other jobs
    affect all of them alike; a row per configuration with its median step."""
    device = configs[0].device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # as rmae.train after its first update: no index checks (host syncs) in the timed steps; turned off before
    # the warm-up, since a compiled reference path guards on the setting and would compile again after a change
    kernels.set_index_checks(False)
    warm, peak = [], []
    for config in configs:
        if device.type == "cuda":
            others = torch.cuda.memory_allocated(device) - config.own_bytes  # what the other configurations hold
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            config.step()
        sync()
        warm.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak.append((torch.cuda.max_memory_allocated(device) - others) / 2**30)
    times = round_robin([config.step for config in configs], steps, sync)
    kernels.set_index_checks(None)
    rows = []
    for i, config in enumerate(configs):
        med = statistics.median(times[i])
        flops = 3 * forward_flops_per_image(config.model) * config.batch
        # fp32 matmuls run as TF32 on CUDA (main() allows it, as rmae.train's GPU runs do)
        shown_dtype = "tf32" if config.dtype == "fp32" and device.type == "cuda" else config.dtype
        row = {"model": config.variant, "arch": config.arch, "img_size": config.img_size, "batch": config.batch,
               "dtype": shown_dtype, "compiled": config.compiled, "step_ms": med * 1e3,
               "img_per_s": config.batch / med, "warmup_s": warm[i], "tflops_per_s": flops / med / 1e12,
               "loss": float(config.loss.detach()),
               "params_m": sum(p.numel() for p in config.model.parameters()) / 1e6}
        if peak:
            row["peak_mem_gb"] = peak[i]
        rows.append(row)
    return rows


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--arch", default="rmae_base_patch16" if cuda else "rmae_tiny_patch16")
    ap.add_argument("--img-size", type=int, default=224 if cuda else 96)
    ap.add_argument("--batch", type=int, default=128 if cuda else 16)
    ap.add_argument("--steps", type=int, default=20 if cuda else 5)
    ap.add_argument("--warmup", type=int, default=5 if cuda else 3)
    ap.add_argument("--models", default="mae,rmae")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", default="eager,compiled", help="eager,compiled or one of them")
    ap.add_argument("--kernel-impl", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_train.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_bf16_matmul(device) if device.type == "cuda" else None
    spec = spec_peak_bf16(device) if device.type == "cuda" else None
    machine = f"{describe_machine()}, {torch.get_num_threads()} torch threads"
    rows, bases, failures = [], {}, []  # bases: the first row of each model
    # written after every row (rows and failures grow in place): a run stopped by a time limit keeps what it has
    result = {"machine": machine, "torch": torch.__version__, "peak_bf16_tflops": peak / 1e12 if peak else None,
              "spec_peak_bf16_tflops": spec / 1e12 if spec else None, "rows": rows, "failures": failures}
    # in the order of --compile (compiled,eager: the rows of the goals first, for a run under a time limit); the
    # models of one compile mode and dtype are timed together, step by step (their ratio is a goal)
    for compiled in [c == "compiled" for c in args.compile.split(",")]:
        for dtype in args.dtypes.split(","):
            what = f"{'compiled' if compiled else 'eager'} {dtype}"
            try:
                configs = [Config(variant, args.arch, args.img_size, args.batch, device, dtype, compiled,
                                  args.kernel_impl) for variant in args.models.split(",")]
                timed = bench_together(configs, args.steps, args.warmup)
            except Exception as e:  # (torch.compile of a path on the card, say): recorded, the others run
                failures.append(f"{args.models} {what}: {type(e).__name__}: {e}")
                print(f"FAILED {failures[-1]}", file=sys.stderr, flush=True)
                timed = []
            configs = None  # (their memory, before the next pair)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for row in timed:
                variant = row["model"]
                if peak:
                    row["of_measured_peak"] = row["tflops_per_s"] * 1e12 / peak
                if spec:
                    row["mfu"] = row["tflops_per_s"] * 1e12 / spec
                base = bases.setdefault(variant, row)
                row["baseline"] = f"{'compiled' if base['compiled'] else 'eager'} {base['dtype']}"
                row["speedup_vs_baseline"] = row["img_per_s"] / base["img_per_s"]
                mae = next((r for r in rows if r["model"] == "mae" and r["compiled"] == compiled
                            and r["dtype"] == row["dtype"]), None)
                if variant != "mae" and mae is not None:  # the goal: R-MAE step <= 1.08x MAE's
                    row["step_vs_mae"] = row["step_ms"] / mae["step_ms"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            write_report(args.out, result, markdown(result))
    print(markdown(result))
    return 1 if failures else 0


def markdown(result) -> str:
    failed = "".join(f"\n\nFAILED {f}" for f in result.get("failures", []))  # (after a blank line: the table ends)
    if not result["rows"]:
        return f"Machine: {result['machine']}. No row ran.{failed}"
    has_mfu = any("mfu" in r for r in result["rows"])
    has_measured = any("of_measured_peak" in r for r in result["rows"])
    r0 = result["rows"][0]
    # each model's first row that ran (the same for all unless a row failed)
    baselines = {r["baseline"] for r in result["rows"]}
    baseline = r0["baseline"] if len(baselines) == 1 else "the model's first row"
    torch_note = "" if f"torch {result['torch']}" in result["machine"] else f", torch {result['torch']}"
    lines = [f"Machine: {result['machine']}{torch_note}"
             + (f", bf16 spec peak {result['spec_peak_bf16_tflops']:.0f} TFLOP/s" if has_mfu else "")
             + (f", measured bf16 matmul peak {result['peak_bf16_tflops']:.0f} TFLOP/s" if has_measured else "")
             + f". {r0['arch']}, {r0['img_size']} px, batch {r0['batch']}, k=8 regions for R-MAE; "
             "forward+backward+AdamW, median step; step vs MAE's: the same compile and dtype (goal <= 1.08x).", "",
             f"| model | compile | dtype | step (ms) | img/s | vs {baseline} | step vs MAE's | model TFLOP/s |"
             + (" MFU (spec) |" if has_mfu else "") + (" of measured peak |" if has_measured else ""),
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if has_mfu else "")
             + ("---:|" if has_measured else "")]
    for r in result["rows"]:
        vs_mae = f"{r['step_vs_mae']:.3f}x" if "step_vs_mae" in r else ""
        line = (f"| {r['model']} | {'compiled' if r['compiled'] else 'eager'} | {r['dtype']} | {r['step_ms']:.1f} | "
                f"{r['img_per_s']:.1f} | {r['speedup_vs_baseline']:.2f}x | {vs_mae} | {r['tflops_per_s']:.3g} |")
        if has_mfu:
            line += f" {100 * r['mfu']:.1f}% |" if "mfu" in r else " |"
        if has_measured:
            line += f" {100 * r['of_measured_peak']:.1f}% |"
        lines.append(line)
    return "\n".join(lines) + failed


if __name__ == "__main__":
    sys.exit(main())

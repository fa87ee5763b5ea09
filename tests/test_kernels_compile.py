"""Ahead-of-time GPU compile of every rmae.kernels Triton kernel, on a machine without a GPU.

The interpreter (tests/test_kernels.py) checks numerics but not that the kernels compile for a real GPU
(types, layouts, tl.dot shapes, loop-carried values). Here each launcher runs on CPU tensors in a
subprocess *without* TRITON_INTERPRET, with every kernel's ``__getitem__`` replaced by a hook that compiles
the exact signature the launcher passes to sm_90 (H100/H200) cubin, for every autotune config, using the
ptxas bundled with Triton. Cold (empty Triton cache) this takes 1-3 minutes on 2 shared cores; compiled
kernels are cached in ~/.triton/cache, so later runs take seconds. Nothing is launched; the outputs are not checked.
"""
import os
import re
import subprocess
import sys

import pytest

CASES = ["gather", "unshuffle", "pool", "region_tokens", "region_tokens_labels", "bce"]


@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_for_gpu(case):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    compiled = re.search(r"compiled (\d+) kernel variants", p.stdout)
    assert compiled and int(compiled.group(1)) > 0, p.stdout


# ---------------------------------------------------------------------------------------------------
# subprocess side
# ---------------------------------------------------------------------------------------------------
def _main(case):  # pragma: no cover - runs in the subprocess
    assert os.environ.get("TRITON_INTERPRET") != "1"
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rmae.kernels import bce, gather, pool, region_embed, unshuffle

    PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
           torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
    if hasattr(torch, "uint16"):
        PTR[torch.uint16] = "*u16"
    # the label dtypes the labels kernels take, one per activation dtype below (uint16: masks loaded as such)
    LABELS = [torch.int16, getattr(torch, "uint16", torch.int32), torch.int32]
    TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
    count = [0]

    class CompileOnly:
        def __init__(self, autotuner):
            self.at = autotuner
            self.fn = autotuner.fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                for cfg in self.at.configs:
                    kw = dict(kwargs, **cfg.kwargs)
                    g = grid(kw) if callable(grid) else grid
                    assert all(int(x) >= 1 for x in g), g
                    assert all(int(x) <= 65535 for x in g[1:]), f"grid axes 1 and 2 stop at 65535: {g}"
                    sig, consts = {}, {}
                    names = self.fn.arg_names
                    vals = dict(zip(names, args), **kw)
                    for prm in self.fn.params:
                        v = vals[prm.name]
                        if prm.is_constexpr:
                            sig[prm.name] = "constexpr"
                            consts[prm.name] = v
                        elif isinstance(v, torch.Tensor):
                            sig[prm.name] = PTR[v.dtype]
                        elif isinstance(v, bool):
                            sig[prm.name] = "i1"
                        elif isinstance(v, float):
                            sig[prm.name] = "fp32"
                        elif isinstance(v, int):
                            sig[prm.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                        else:
                            raise TypeError(f"{prm.name}: {type(v)}")
                    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                    src = ASTSource(self.fn, sig, constexprs=consts)
                    c = triton.compile(src, target=TARGET, options=opts)
                    assert len(c.asm["cubin"]) > 0
                    count[0] += 1
            return launch

    for mod in (bce, gather, pool, region_embed, unshuffle):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                setattr(mod, name, CompileOnly(obj))

    g = torch.Generator().manual_seed(0)
    B, N, L, C, k, Cr = 2, 196, 49, 768, 3, 128
    ids = torch.rand(B, N, generator=g).argsort(1)
    for dt, label_dtype in zip((torch.float32, torch.bfloat16, torch.float16), LABELS):
        if case == "gather":
            x = torch.randn(B, N, C).to(dt)
            r = torch.randn(B, k, N, Cr).to(dt)
            keep = ids[:, :L].contiguous()
            gather._launch_gather(x, r, keep, L)
            gather._launch_gather(x, None, keep, L)
            gather._launch_gather(None, r[:, :, :L], gather._inverse_index(keep, N), N)
        elif case == "unshuffle":
            x = torch.randn(B, L + 1, 512).to(dt)
            m = torch.randn(1, 1, 512)
            pos = torch.randn(1, N + 1, 512)
            restore = ids.argsort(1)
            unshuffle._launch_fwd(x, m, restore, pos)
            gout = torch.randn(B, N + 1, 512).to(dt)
            unshuffle._launch_bwd(gout, restore, L, dt, torch.float32, torch.float32, True, True, False)
            unshuffle._launch_bwd(gout, restore, L, dt, torch.float32, torch.float32, True, True, True)
        elif case == "pool":
            x = torch.randn(B, k, L, 128).to(dt)
            pool._launch_fwd(x, x)
            pool._launch_fwd(x, None)
            gout = torch.randn(B, k, 128).to(dt)
            pool._launch_bwd(gout, L, dt, dt, True, True)
            pool._launch_bwd(gout, L, dt, None, True, False)
        elif case in ("region_tokens", "region_tokens_labels"):
            P, H, D = 16, 224, 128
            keep = ids[:, :L].contiguous()
            w = torch.randn(D, 1, P, P).to(dt)
            b = torch.randn(D).to(dt)
            pos = torch.randn(1, N, D)
            if case == "region_tokens":
                src = torch.randint(0, 2, (B, k, H, H), dtype=torch.uint8)
                sel = lid = None
            else:
                src = torch.randint(0, 9, (B, 3, H, H)).to(label_dtype)
                sel = torch.randint(0, 3, (B, k))
                lid = torch.randint(-1, 9, (B, k))
            region_embed._launch_fwd(src, keep, sel, lid, w, b, pos, P, k, sel is not None)
            gout = torch.randn(B, k, L, D).to(dt)
            region_embed._launch_bwd(gout, src, keep, sel, lid, P, k, dt, dt, True, True, split=4)
        elif case == "bce":
            P, H = 16, 224
            z = torch.randn(B, k, N, P * P).to(dt)
            maps = torch.randint(0, 2, (B, k, H, H), dtype=torch.uint8)
            labels = torch.randint(0, 9, (B, 3, H, H)).to(label_dtype)
            sel = torch.randint(0, 3, (B, k))
            lid = torch.randint(-1, 9, (B, k))
            mask = torch.ones(B, N)
            scale = torch.ones(1)
            for src, s_, l_ in ((maps, None, None), (labels, sel, lid)):
                bce._launch(z, src, s_, l_, mask, P, 0.5, backward=False)
                bce._launch(z, src, s_, l_, mask, P, 0.5, backward=True, scale=scale)
    if case in ("gather", "unshuffle"):  # 70,000 patches (a 4232 px image): the grid stays within CUDA's limits
        big_n, small_c, before = 70_000, 8, count[0]
        keep = torch.arange(big_n).expand(1, big_n).contiguous()
        if case == "gather":
            gather._launch_gather(torch.randn(1, big_n, small_c), None, keep, big_n)
        else:
            unshuffle._launch_fwd(torch.randn(1, big_n + 1, small_c), torch.randn(1, 1, small_c), keep,
                                  torch.randn(1, big_n + 1, small_c))
            unshuffle._launch_bwd(torch.randn(1, big_n + 1, small_c), keep, big_n, torch.float32, torch.float32,
                                  torch.float32, True, True, True)
        assert count[0] > before, "the 70,000-patch launches compiled nothing"
    print(f"compiled {count[0]} kernel variants for sm_90")


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1])

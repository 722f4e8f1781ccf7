"""Tile-size sweep of the project's Triton kernels on a GPU (a tuning tool, not a test).

    PYTHONPATH=$PWD/.gpu-site:/tmp/site python3 tests_quant/gpu_kernel_sweep.py [OUT_DIR] [--all]

Times each candidate configuration of the W4A4 GEMM (quantized activation given), the activation
quantization and the low-rank input at the benchmark's shapes (AWQ: ``gpu_awq_sweep.py``), with bf16 and FP8 GEMMs
of the same shapes as yardsticks, and prints the best configuration per shape. The chosen tables in
``triton_w4a4._config`` comes from this output (docs/benchmarks.md).
"""
import itertools
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from comfy.quant.kernels import triton_w4a4 as W  # noqa: E402


def us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def rand_codes(n, k):
    return torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device="cuda")


def yardsticks(m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    out = {"bf16": us(lambda: torch.nn.functional.linear(x, w))}
    xq, wq = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    mp = max(16, m)
    if mp != m:
        xq = torch.nn.functional.pad(x, (0, 0, 0, mp - m)).to(torch.float8_e4m3fn)
    out["fp8"] = us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return out


DEADLINE = time.time() + float(os.environ.get("SWEEP_SECONDS", "330"))


def quant_sweep(rows):
    best = {}
    for m, k in ((4096, 3072), (4096, 12288)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        smooth = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        nbytes = m * k * 3 + m * k // 64 * 4
        for bm, groups, shuffle, w in itertools.product((16, 32, 64), (1, 4), (True, False), (2, 4)):
            c = dict(BLOCK_M=bm, GROUPS=groups, SHUFFLE=shuffle, num_warps=w)
            t = us(lambda: W.quantize(x, smooth, True, config=c))
            rows.append({"op": "quantize", "M": m, "K": k, **c, "us": t, "GBps": nbytes / t / 1e3})
            if k not in best or t < best[k][0]:
                best[k] = (t, c)
        print(f"quantize {m}x{k}: best {best[k][0]:.1f} us ({nbytes / best[k][0] / 1e3:.0f} GB/s) {best[k][1]}",
              flush=True)
    return best[3072][1]


def w4a4_sweep(rows, qcfg):
    shapes = [(4096, 3072, 3072), (4096, 3072, 12288), (1024, 3072, 3072)]
    tiles = [(128, 64, 4, 3), (256, 64, 8, 3), (256, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (256, 64, 4, 3),
             (64, 128, 4, 4), (128, 128, 8, 3)]
    cands = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, GROUP_M=8, BLOCK_R=32, SWAP=True, PIPE=True)
             for bm, bn, w, st in tiles]
    for m, k, n in shapes:
        if time.time() > DEADLINE:
            print("sweep deadline reached", flush=True)
            break
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        smooth = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        down = torch.randn(k, 32, device="cuda", dtype=torch.bfloat16) * 0.05
        up = torch.randn(n, 32, device="cuda", dtype=torch.bfloat16) * 0.05
        wq = rand_codes(n, k)
        ws = torch.rand(k // 64, n, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        q, s = W.quantize(x, smooth, False, config=qcfg)
        la = W.lora_activation(x, down)
        base = yardsticks(m, k, n)
        t_quant = us(lambda: W.quantize(x, smooth, False, config=qcfg))
        t_la = us(lambda: W.lora_activation(x, down))
        best = None
        for c in cands:
            if time.time() > DEADLINE:
                break
            try:
                t = us(lambda: W.gemm(q, s, m, wq, ws, la, up, bias, torch.bfloat16, config=c))
            except Exception as e:  # out of resources etc.
                print(f"  skip {c}: {type(e).__name__}: {str(e)[:80]}")
                continue
            rows.append({"op": "w4a4_gemm", "M": m, "K": k, "N": n, **c, "us": t,
                         "TOPS": 2 * m * k * n / t / 1e6, **base})
            if best is None or t < best[0]:
                best = (t, c)
        if best is None:
            continue
        total = best[0] + t_quant + t_la
        print(f"W4A4 M={m} {k}->{n}: best gemm {best[0]:.1f} us ({2 * m * k * n / best[0] / 1e6:.0f} TOPS) "
              f"{best[1]}; quant {t_quant:.1f} us; lora_in {t_la:.1f} us; total {total:.1f} us; bf16 "
              f"{base['bf16']:.1f} fp8 {base['fp8']:.1f}; bf16/int4 {base['bf16'] / total:.2f}", flush=True)
        rows.append({"op": "w4a4_best", "M": m, "K": k, "N": n, "gemm_us": best[0], "quant_us": t_quant,
                     "lora_in_us": t_la, "total_us": total, "config": best[1], **base})


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else None
    print(torch.cuda.get_device_name(), torch.__version__, "triton", triton.__version__, flush=True)
    rows = []
    qcfg = W.QUANT_CONFIG
    if "--all" in sys.argv:
        qcfg = quant_sweep(rows)
    w4a4_sweep(rows, qcfg)
    if out:
        with open(f"{out}/sweep.json", "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()

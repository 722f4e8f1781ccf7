"""Hopper timings of the project's int4 kernels against bf16 and FP8 GEMMs of the same run (a tool, not a test).

    PYTHONPATH=$PWD python3 tests_quant/gpu_hopper_bench.py [OUT_DIR] [--sweep]

For each shape: the int8 W4A4 path (``quantize`` + ``x @ proj_down`` + int8 GEMM), the FP8 path (one
``activation`` pass + FP8 GEMM), each part alone, cuBLAS bf16 (``F.linear``) and FP8 (``torch._scaled_mm``
on FP8 copies, per-tensor scales: the GEMM alone), and the device copy bandwidth (AWQ:
``gpu_awq_sweep.py``). Before timing, the FP8 GEMM is checked
bit-equal to the int8 GEMM (the same arithmetic: exact group dots, ``a·(w·D)`` in fp32) and the fused
activation pass bit-equal to ``quantize``. ``--sweep`` also times tile candidates and prints the best.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from comfy.quant.kernels import triton_w4a4 as W  # noqa: E402

E4M3 = torch.float8_e4m3fn
SHAPES = [(4096, 3072, 3072), (4096, 3072, 9216), (4096, 3072, 12288), (4096, 12288, 3072), (1024, 3072, 3072)]


def us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_tbps():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / us(lambda: b.copy_(a)) / 1e6


def yardsticks(m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    out = {"bf16": us(lambda: F.linear(x, w))}
    mp = max(16, m)
    xq = F.pad(x, (0, 0, 0, mp - m)).to(E4M3)
    wq = w.to(E4M3)
    one = torch.ones((), device="cuda")
    out["fp8"] = us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return out


def w4a4_case(m, k, n, rank=32):
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(x=x, smooth=torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5,
                down=torch.randn(k, rank, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05,
                up=torch.randn(n, rank, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05,
                w=torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device="cuda", generator=g),
                ws=torch.rand(k // 64, n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
                bias=torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g))


def check_w4a4(c, m):
    """FP8 GEMM == int8 GEMM and fused activation == quantize, bit for bit, at full size."""
    q, s = W.quantize(c["x"], c["smooth"], False)
    la = W.lora_activation(c["x"], c["down"])
    q8, s8, la8 = W.activation(c["x"], c["smooth"], c["down"], False, codes=E4M3)
    codes_equal = torch.equal(q.float(), q8.float()) and torch.equal(s, s8)
    la_err = ((la.float() - la8.float()).abs().max() / la.float().abs().max()).item()
    y = W.gemm(q, s, m, c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16)
    y8 = W.gemm(q8, s8, m, c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16)
    return {"codes_equal": codes_equal, "la_rel_err": la_err, "gemm_equal": torch.equal(y, y8),
            "gemm_max_diff": (y.float() - y8.float()).abs().max().item()}


def w4a4_rows(rows, sweep):
    for m, k, n in SHAPES:
        c = w4a4_case(m, k, n)
        x = c["x"]
        chk = check_w4a4(c, m)
        base = yardsticks(m, k, n)
        q, s = W.quantize(x, c["smooth"], False)
        la = W.lora_activation(x, c["down"])
        q8, s8, _ = W.activation(x, c["smooth"], c["down"], False, codes=E4M3)
        t = {"quantize": us(lambda: W.quantize(x, c["smooth"], False)),
             "lora_in": us(lambda: W.lora_activation(x, c["down"])),
             "activation_fused": us(lambda: W.activation(x, c["smooth"], c["down"], False, codes=E4M3)),
             "gemm_int8": us(lambda: W.gemm(q, s, m, c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16)),
             "gemm_fp8": us(lambda: W.gemm(q8, s8, m, c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16))}
        best = None
        if sweep and k == 3072 and n == 3072:
            for cfg in fp8_candidates(m):
                try:
                    tt = us(lambda: W.gemm_fp8(q8, s8, m, c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16,
                                               config=dict(cfg)))
                except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
                    print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                    continue
                rows.append({"op": "fp8_tile", "M": m, "K": k, "N": n, **cfg, "us": tt})
                if best is None or tt < best[0]:
                    best = (tt, cfg)
        if sweep and (m, k, n) == SHAPES[0]:
            act_best = None
            for bm, w, ks in ((16, 2, 0), (16, 4, 0), (32, 4, 0), (64, 4, 0), (32, 8, 0), (64, 8, 0), (32, 4, 1),
                              (16, 2, 2), (32, 4, 4)):
                cfg = dict(BLOCK_M=bm, num_warps=w)
                if ks:
                    cfg["K_SPLIT"] = ks
                tt = us(lambda: W.activation(x, c["smooth"], c["down"], False, codes=E4M3, config=dict(cfg)))
                rows.append({"op": "act_tile", "M": m, "K": k, **cfg, "us": tt})
                if act_best is None or tt < act_best[0]:
                    act_best = (tt, cfg)
            print(f"  activation best {act_best[0]:.1f} us {act_best[1]}", flush=True)
        act_bytes = m * k * 2 + m * k + m * k // 64 * 4 + m * 32 * 4
        row = {"op": "w4a4", "M": m, "K": k, "N": n, **base, **t, **chk,
               "act_GBps": act_bytes / t["activation_fused"] / 1e3,
               "old_total": t["quantize"] + t["lora_in"] + t["gemm_int8"],
               "new_total": t["activation_fused"] + t["gemm_fp8"], "best_tile": best}
        rows.append(row)
        print(f"W4A4 M={m} {k}->{n}: bf16 {base['bf16']:.1f} fp8 {base['fp8']:.1f} | int8 gemm {t['gemm_int8']:.1f} "
              f"fp8 gemm {t['gemm_fp8']:.1f} (/fp8 {t['gemm_fp8'] / base['fp8']:.2f}) | quant {t['quantize']:.1f} + "
              f"lora_in {t['lora_in']:.1f} -> fused {t['activation_fused']:.1f} ({row['act_GBps']:.0f} GB/s) | total "
              f"old {row['old_total']:.1f} new {row['new_total']:.1f} | eq codes {chk['codes_equal']} gemm "
              f"{chk['gemm_equal']} la_err {chk['la_rel_err']:.1e}"
              + (f" | best {best[0]:.1f} {best[1]}" if best else ""), flush=True)


def fp8_candidates(m):
    tiles = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3),
             (256, 128, 8, 3), (64, 256, 8, 3), (128, 64, 8, 4)]
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, GROUP_M=8, BLOCK_R=32, SWAP=True)
           for bm, bn, w, st in tiles]
    return out + [dict(out[0], SWAP=False), dict(out[2], SWAP=False)]


def run_info(**extra) -> dict:
    """The first row of a GPU tool's JSON: device (the CPU when there is none), versions, date, ``extra``."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **extra}


def save_rows(path, rows) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, default=str)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sweep = "--sweep" in sys.argv
    info = run_info(copy_TBps=copy_tbps())
    print(info, flush=True)
    rows = [info]
    try:
        w4a4_rows(rows, sweep)
    finally:
        if args:
            save_rows(f"{args[0]}/hopper_bench.json", rows)


if __name__ == "__main__":
    main()

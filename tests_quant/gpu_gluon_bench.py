"""Hopper timings and full-size checks of the warp-specialized Gluon W4A4 GEMM (a tool, not a test).

    PYTHONPATH=$PWD python3 tests_quant/gpu_gluon_bench.py [OUT_DIR] [--sweep]

Per shape (M, K, N): cuBLAS bf16 and FP8 (the yardsticks, this run), the Triton int8 and FP8 GEMMs and
the Gluon GEMM (rank-32 low-rank branch and bias, bf16 out), and the whole layer (one activation pass
+ GEMM). Before timing: the Gluon GEMM bit-equal to the Triton FP8 GEMM without a low-rank branch (fp32
out, the same arithmetic), and within 2 bf16 ulps of it with one. ``--sweep`` times pipeline depths.
"""
import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 2)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

from comfy.quant.kernels import gluon_w4a4 as G  # noqa: E402
from comfy.quant.kernels import triton_w4a4 as W  # noqa: E402
from gpu_hopper_bench import E4M3, SHAPES, run_info, save_rows, us, w4a4_case, yardsticks  # noqa: E402


def check(c, m):
    q8, s8, la = W.activation(c["x"], c["smooth"], c["down"], False, codes=E4M3)
    main = (q8, s8, m, c["w"], c["ws"], None, c["up"], None, torch.float32)
    full = (q8, s8, m, c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16)
    y_main = G.gemm(*main)
    y_full = G.gemm(*full)
    ref_full = W.gemm_fp8(*full).float()
    ulp = ref_full.abs().clamp(min=2.0 ** -126) * 2.0 ** -7
    return {"main_bit_equal": torch.equal(y_main, W.gemm_fp8(*main)),
            "full_bit_equal": torch.equal(y_full.float(), ref_full),
            "full_within_2ulp": bool(((y_full.float() - ref_full).abs() <= 2 * ulp).all()),
            "deterministic": torch.equal(y_full, G.gemm(*full))}


def rows_for(m, k, n, sweep):
    c = w4a4_case(m, k, n)
    chk = check(c, m)
    base = yardsticks(m, k, n)
    x = c["x"]
    q, s = W.quantize(x, c["smooth"], False)
    q8, s8, la = W.activation(x, c["smooth"], c["down"], False, codes=E4M3)
    tail = (c["w"], c["ws"], la, c["up"], c["bias"], torch.bfloat16)
    t = {"gemm_int8": us(lambda: W.gemm(q, s, m, *tail)),
         "gemm_fp8_triton": us(lambda: W.gemm_fp8(q8, s8, m, *tail)),
         "gemm_gluon": us(lambda: G.gemm(q8, s8, m, *tail)),
         "activation": us(lambda: W.activation(x, c["smooth"], c["down"], False, codes=E4M3))}
    sweep_rows = []
    if sweep:
        for stages, conv, bt in ((3, 40, 128), (5, 40, 128), (6, 40, 128), (4, 56, 128), (4, 40, 64),
                                 (6, 40, 64)):
            cfg = dict(STAGES=stages, converter_regs=conv, BLOCK_T=bt)
            try:
                tt = us(lambda: G.gemm(q8, s8, m, *tail, config=cfg))
            except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
                print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            sweep_rows.append({"op": "gluon_cfg", "M": m, "K": k, "N": n, **cfg, "us": tt})
    layer = t["activation"] + t["gemm_gluon"]
    row = {"op": "gluon", "M": m, "K": k, "N": n, **base, **t, **chk, "layer": layer,
           "gemm_over_fp8": t["gemm_gluon"] / base["fp8"], "layer_over_bf16": layer / base["bf16"]}
    best = min(sweep_rows, key=lambda r: r["us"]) if sweep_rows else None
    print(f"M={m} {k}->{n}: bf16 {base['bf16']:.1f} fp8 {base['fp8']:.1f} | gluon {t['gemm_gluon']:.1f} "
          f"(/fp8 {row['gemm_over_fp8']:.2f}) triton-fp8 {t['gemm_fp8_triton']:.1f} int8 {t['gemm_int8']:.1f} | "
          f"layer {layer:.1f} (/bf16 {row['layer_over_bf16']:.2f}) | {chk}"
          + (f" | best {best['us']:.1f} {best['STAGES']}/{best['converter_regs']}/{best['BLOCK_T']}" if best else ""), flush=True)
    return [row] + sweep_rows


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    info = run_info(config=G.CONFIG)
    print(info, flush=True)
    rows = [info]
    try:
        for m, k, n in SHAPES:
            rows += rows_for(m, k, n, "--sweep" in sys.argv)
    finally:
        if args:
            save_rows(f"{args[0]}/gluon_bench.json", rows)


if __name__ == "__main__":
    main()

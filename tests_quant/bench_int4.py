"""Benchmark: int4 linears (through MixedPrecisionOps.Linear) against bf16 and FP8 in the same run.

Not a test (pytest does not collect it). Run on a GPU machine:

    python tests_quant/bench_int4.py [--json OUT]

Shapes are Qwen-Image's (dim 3072, MLP 12288, modulation 3072 → 18432). Each row prints the
median time of the int4 layer, bf16 ``F.linear`` and FP8 ``torch._scaled_mm`` (per-tensor scales,
the usual FP8 inference path) and the ratios; LoRA rows show the cost of appended rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])

import comfy.ops  # noqa: E402
from comfy.quant.deltas import LowRankDelta  # noqa: E402
from comfy.quant.formats import format_of  # noqa: E402
from factories import awq_tensors, prefixed, svdquant_tensors  # noqa: E402


def timed(fn, iters=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def int4_linear(tensors, n, k):
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16).Linear(k, n, device="cuda")
    lin._load_from_state_dict(prefixed("l", tensors), "l.", {}, True, [], [], [])
    return lin


def fp8_linear(w, x):
    if not hasattr(torch, "float8_e4m3fn"):
        return None
    try:
        wq = (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn)
        ws = (w.abs().max() / 448).float().reshape(())
        xs = (x.abs().max() / 448).float().reshape(())
        xq = (x / xs).to(torch.float8_e4m3fn)
        torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
        return lambda: torch._scaled_mm((x / xs).to(torch.float8_e4m3fn), wq.t(), scale_a=xs, scale_b=ws,
                                        out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):
        return None


def bench_row(name, lin, n, k, m):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    t_int4 = timed(lambda: lin(x))
    t_bf16 = timed(lambda: torch.nn.functional.linear(x, w))
    fp8 = fp8_linear(w, x)
    t_fp8 = timed(fp8) if fp8 is not None else float("nan")
    return {"op": name, "M": m, "K": k, "N": n, "int4_us": t_int4, "bf16_us": t_bf16, "fp8_us": t_fp8,
            "int4_vs_bf16": t_bf16 / t_int4, "int4_vs_fp8": t_fp8 / t_int4}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    rows = []
    for n, k, m in ((3072, 3072, 4096), (12288, 3072, 4096), (3072, 12288, 4096), (3072, 3072, 1024)):
        lin = int4_linear(svdquant_tensors(n, k, 32), n, k)
        rows.append(bench_row("svdquant_w4a4 r32", lin, n, k, m))
        extra = LowRankDelta(torch.randn(n, 16) * 0.01, torch.randn(16, k) * 0.01)
        format_of(lin.weight).apply_deltas([(lin, [extra])])  # LoRA rank 16 appended: r32 -> r48
        rows.append(bench_row("svdquant_w4a4 r32 + LoRA r16", lin, n, k, m))
    for m in (1, 2, 8):
        n, k = 18432, 3072
        lin = int4_linear(awq_tensors(n, k), n, k)
        rows.append(bench_row("awq_w4a16", lin, n, k, m))
        extra = LowRankDelta(torch.randn(n, 16) * 0.01, torch.randn(16, k) * 0.01)
        format_of(lin.weight).apply_deltas([(lin, [extra])])
        rows.append(bench_row("awq_w4a16 + LoRA r16", lin, n, k, m))
    info = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version
        info["comfy_kitchen"] = version("comfy-kitchen")
    except Exception:
        info["comfy_kitchen"] = "unknown"
    print(json.dumps(info))
    print(f"{'op':32} {'M':>5} {'K':>6} {'N':>6} {'int4 us':>9} {'bf16 us':>9} {'fp8 us':>9} "
          f"{'bf16/int4':>9} {'fp8/int4':>9}")
    for r in rows:
        print(f"{r['op']:32} {r['M']:>5} {r['K']:>6} {r['N']:>6} {r['int4_us']:>9.1f} {r['bf16_us']:>9.1f} "
              f"{r['fp8_us']:>9.1f} {r['int4_vs_bf16']:>9.3f} {r['int4_vs_fp8']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

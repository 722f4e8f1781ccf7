"""AWQ W4A16 tile sweep on a GPU (a tool, not a test): every M from 1 to 4096, two shapes, against bf16 and
torch's tinygemm, with each candidate checked before it is timed.

    PYTHONPATH=$PWD python3 tests_quant/gpu_awq_sweep.py OUT_DIR [--quick]
    TRITON_INTERPRET=1 python3 tests_quant/gpu_awq_sweep.py OUT_DIR --cpu-smoke   # the script's own check

For N, K = 18432, 3072 (the modulation linears) and 3072, 3072, and M in ``ROWS``: cuBLAS bf16
(``F.linear``), ``torch.ops.aten._weight_int4pack_mm`` (tinygemm, M <= 64) and the project's kernels over
``candidates(m)`` (GEMV tiles and split-K for few rows, GEMM tiles for many, the exact and the
rounded-weight arithmetic). Every output is first checked against the float64 reference within its derived
bound (``reference.awq_kernel_tolerance`` exact, ``reference.kernel_tolerance`` rounded weight, also for
tinygemm) and bit for bit against the other candidates of the same arithmetic (same kernel, split-K and
sums); a candidate that fails is reported and not timed. Times are CUDA-graph replays over enough weight
copies to overflow L2, per call. Prints one line per (shape, M), then ``CONFIGS = {...}`` for
``triton_awq.py`` (per M bucket, the exact candidate best over both shapes), and writes
``OUT_DIR/awq_sweep.json``. Kernels are compiled first by worker processes (``--jobs``, default 16), which
fill Triton's cache. About 2 minutes on an H100 (``--quick``: M 1, 16, 256 only). ``--cpu-smoke`` runs the
same code on the CPU under Triton's interpreter at toy shapes (wall-clock times, no tinygemm): it checks
the script, not the kernels' speed.
"""
import argparse
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

ROOT = __file__.rsplit("/", 2)[0]
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests_quant"))

from comfy.quant.kernels import triton_awq as A  # noqa: E402
from gpu_hopper_bench import run_info, save_rows  # noqa: E402
from reference import awq_kernel_tolerance, awq_magnitude, awq_weight, kernel_tolerance  # noqa: E402

SHAPES = [(18432, 3072), (3072, 3072)]  # (N, K)
ROWS = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)
GROUP = 64
DEVICE = torch.device("cuda")
L2_OVERFLOW = 160 << 20  # bytes of operands per timed graph: several times the H100's 50 MB L2


def candidates(m: int) -> list[dict]:
    """GEMV tiles (split-K by PER_SM) up to 64 rows and a few GEMM-sized ones from 256, GEMM tiles from 32
    rows; exact, and rounded-weight variants of some."""
    out = []
    if m <= 64:
        bm = max(8, triton.next_power_of_2(m))
        tiles = [(64, 2), (128, 2), (256, 4)] if bm <= 16 else [(64, 2), (128, 2), (64, 4)]
        per_sm = (2, 4, 8) if bm <= 16 else (1, 2, 4)
        out += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=4, PER_SM=p, EXACT=True, XSUM_MMA=True)
                for bn, w in tiles for p in per_sm]
        base = dict(BLOCK_M=bm, BLOCK_N=128, num_warps=2, num_stages=4, PER_SM=per_sm[1], EXACT=True, XSUM_MMA=True)
        out += [dict(base, num_stages=3), dict(base, num_stages=6), dict(base, XSUM_MMA=False), dict(base, EXACT=False)]
    if m >= 256:  # the GEMV kernel with GEMM-sized tiles (its K order needs no shared-memory copy of the weight)
        out += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=3, PER_SM=1, EXACT=exact, XSUM_MMA=True)
                for bm, bn, w in ((64, 128, 2), (128, 128, 4), (64, 128, 4)) for exact in (True, False)]
    if m >= 32:
        tiles = [(32, 128, 4, 4), (64, 128, 8, 3), (64, 256, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
        for bm, bn, w, st in tiles:
            if bm <= max(32, triton.next_power_of_2(m)):
                for exact in (True, False):
                    out.append(dict(GEMM=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, GROUP_M=8,
                                    EXACT=exact, XSUM_MMA=True))
    return out


def _toy(cands: list) -> list:
    """The CPU smoke run's sample: every fifth candidate, tiles cut to what the interpreter runs quickly."""
    return [dict(c, BLOCK_M=min(c["BLOCK_M"], 16), BLOCK_N=min(c["BLOCK_N"], 32)) for c in cands[::5]]


def arithmetic(cfg: dict, m: int, n: int, k: int) -> tuple:
    """What decides the bits of the result: kernel, exact or rounded, how Σx is formed, split-K."""
    split = 1 if cfg.get("GEMM") else A._split(cfg, m, n, k // GROUP, DEVICE)
    return (bool(cfg.get("GEMM")), cfg.get("EXACT", True), cfg.get("XSUM_MMA", True), split)


def make_case(n: int, k: int, seed: int) -> dict:
    """Enough copies of random AWQ operands (and of a bf16 weight) to overflow L2 when called in turn."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    int4_bytes = n * k // 2 + 2 * (k // GROUP) * n * 2
    copies = _copies(int4_bytes)
    ops = []
    for _ in range(copies):
        scale = torch.rand(k // GROUP, n, device=DEVICE, generator=g) * 0.02 + 0.005
        ops.append({"weight": torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device=DEVICE, generator=g),
                    "weight_scale": scale.to(torch.bfloat16),
                    "weight_zeros": (-0.5 * scale + torch.randn(k // GROUP, n, device=DEVICE, generator=g)
                                     * 0.002).to(torch.bfloat16)})
    dense = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, generator=g) / k ** 0.5
             for _ in range(_copies(n * k * 2))]
    return {"ops": ops, "dense": dense, "int4_bytes": int4_bytes, "w64": awq_weight(ops[0], GROUP)}


def _copies(nbytes: int) -> int:
    """Operand copies per timed graph: enough to overflow L2 (2 on the CPU smoke run)."""
    return max(2, math.ceil(L2_OVERFLOW / nbytes)) if DEVICE.type == "cuda" else 2


def tinygemm_operands(t: dict, even_high: bool):
    """tinygemm's packing of the same codes (two per byte, the even column in the high nibble if
    ``even_high``) and its (K/G, N, 2) scale-and-zero table; its dequantization is (q − 8)·s + z as AWQ's."""
    b = t["weight"].view(torch.uint8)
    lo, hi = b & 15, b >> 4
    packed = (lo << 4 | hi) if even_high else b
    return (torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), 8),
            torch.stack([t["weight_scale"], t["weight_zeros"]], -1).contiguous())


def graph_us(calls: list, reps: int = 10) -> float:
    """Median time of one call (µs): the calls, each on its own operand copy, captured in one CUDA graph."""
    if DEVICE.type != "cuda":
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copy_tbps() -> float:
    if DEVICE.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_us([lambda: b.copy_(a)], reps=5) / 1e6


def _warm(task):
    """Worker: compile one candidate by running it once on zeros of the real shapes (fills Triton's cache)."""
    n, k, m, cfg = task
    try:
        x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.zeros(n, k // 2, device="cuda", dtype=torch.int8)
        s = torch.zeros(k // GROUP, n, device="cuda", dtype=torch.bfloat16)
        A.gemv(x, q, s, s, GROUP, None, config=dict(cfg))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported by the timing pass too
        return f"{type(e).__name__}: {str(e)[:120]}"


def precompile(tasks: list, jobs: int) -> float:
    """Each distinct compilation once, in ``jobs`` spawned processes (Triton specializes an int equal to 1
    and one divisible by 16, so M = 1, M % 16 == 0 and other M compile apart)."""
    seen, unique = set(), []
    for n, k, m, cfg in tasks:
        key = (n, k, 1 if m == 1 else (16 if m % 16 == 0 else 0), tuple(sorted(cfg.items())))
        if key not in seen:
            seen.add(key)
            unique.append((n, k, m, cfg))
    t0 = time.time()
    try:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            failed = [e for e in pool.map(_warm, unique, chunksize=1) if e]
    except Exception as e:  # the timing pass compiles what is missing, serially
        failed = [f"worker pool: {type(e).__name__}: {e}"]
    print(f"compiled {len(unique)} kernels in {time.time() - t0:.0f} s ({jobs} processes); "
          f"{len(failed)} failed{': ' + failed[0] if failed else ''}", flush=True)
    return time.time() - t0


def check(y, ref, tol) -> float:
    """max |error| / bound (finite, <= 1 passes)."""
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref).abs() / tol).max().item()


def sweep_shape(n: int, k: int, rows, rows_out: list, copy: float):
    case = make_case(n, k, seed=n + k)
    t0 = case["ops"][0]
    tiny_order = None
    for m in rows:
        g = torch.Generator(device=DEVICE).manual_seed(m)
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=g)
        ref = x.double() @ case["w64"].t()
        mag_split = awq_magnitude(t0, x, GROUP)
        tol_round = kernel_tolerance(x.double().abs() @ case["w64"].abs().t(), torch.bfloat16, k)
        row = {"N": n, "K": k, "M": m, "int4_MB": case["int4_bytes"] / 1e6,
               "bf16": graph_us([lambda w=w: F.linear(x, w) for w in case["dense"]])}
        if m <= 64:
            row.update(tinygemm(case, x, ref, tol_round, tiny_order))
            tiny_order = row.get("tinygemm_even_high", tiny_order)
        first_of: dict = {}
        for cfg in candidates(m) if DEVICE.type == "cuda" else _toy(candidates(m)):
            arith = arithmetic(cfg, m, n, k)
            tol = awq_kernel_tolerance(ref, mag_split, torch.bfloat16, k, GROUP, arith[3]) if cfg["EXACT"] \
                else tol_round
            entry = {"op": "awq", "N": n, "K": k, "M": m, **cfg, "SPLIT_K": arith[3]}
            try:
                y = A.gemv(x, t0["weight"], t0["weight_scale"], t0["weight_zeros"], GROUP, None, config=dict(cfg))
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows_out.append(entry)
                continue
            entry["err_over_bound"] = check(y, ref, tol)
            if arith in first_of:
                entry["bit_equal_to_same_arithmetic"] = torch.equal(y, first_of[arith])
            else:
                first_of[arith] = y
            if entry["err_over_bound"] <= 1:
                entry["us"] = graph_us([lambda t=t, c=cfg: A.gemv(x, t["weight"], t["weight_scale"], t["weight_zeros"],
                                                                   GROUP, None, config=dict(c)) for t in case["ops"]])
                entry["GBps"] = case["int4_bytes"] / entry["us"] / 1e3
                entry["copy_frac"] = entry["GBps"] / (copy * 1e3)
            rows_out.append(entry)
        report(row, [r for r in rows_out if r.get("op") == "awq" and r["N"] == n and r["M"] == m], copy)
        rows_out.append({"op": "baseline", **row})


def tinygemm(case, x, ref, tol_round, order) -> dict:
    """tinygemm's time and whether it computes this layer (within kitchen's rounded-weight bound), trying
    both nibble orders until one passes."""
    out = {}
    for even_high in ((order,) if order is not None else (True, False)):
        try:
            packed = [tinygemm_operands(t, even_high) for t in case["ops"]]
            y = torch.ops.aten._weight_int4pack_mm(x, packed[0][0], GROUP, packed[0][1])
        except RuntimeError as e:
            return {"tinygemm_error": str(e)[:120]}
        out["tinygemm_err_over_bound"] = check(y, ref, tol_round)
        if out["tinygemm_err_over_bound"] <= 1:
            out["tinygemm_even_high"] = even_high
            out["tinygemm"] = graph_us([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], GROUP, p[1])
                                        for p in packed])
            return out
    return out


def report(row, cands, copy):
    timed = [c for c in cands if "us" in c]
    bad = [c for c in cands if c.get("err_over_bound", 0) > 1 or "error" in c]
    mismatch = [c for c in cands if c.get("bit_equal_to_same_arithmetic") is False]
    best = min(timed, key=lambda c: c["us"], default=None)
    exact = min((c for c in timed if c["EXACT"]), key=lambda c: c["us"], default=None)
    line = f"N={row['N']:5d} K={row['K']} M={row['M']:4d}: bf16 {row['bf16']:7.1f}"
    if "tinygemm" in row:
        line += f" | tinygemm {row['tinygemm']:7.1f}"
    for name, c in (("exact", exact), ("best", best if best is not exact else None)):
        if c:
            line += (f" | {name} {c['us']:7.1f} us {c['GBps']:5.0f} GB/s ({100 * c['copy_frac']:3.0f}% copy) "
                     f"x{row['bf16'] / c['us']:.2f} bf16 {_short(c)}")
    if bad or mismatch:
        line += f" | {len(bad)} failed, {len(mismatch)} not bit-equal to their arithmetic"
    print(line, flush=True)


def _short(c: dict) -> str:
    keys = ("GEMM", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "PER_SM", "SPLIT_K", "EXACT", "XSUM_MMA")
    return "{" + ", ".join(f"{k}={c[k]}" for k in keys if k in c) + "}"


def best_configs(rows: list) -> dict:
    """Per M, the exact candidate with the smallest geometric mean of (its time / the shape's best exact time)."""
    out = {}
    for m in sorted({r["M"] for r in rows if r.get("op") == "awq"}):
        timed = [r for r in rows if r.get("op") == "awq" and r["M"] == m and "us" in r and r["EXACT"]]
        best = {n: min(r["us"] for r in timed if r["N"] == n) for n, _ in SHAPES if any(r["N"] == n for r in timed)}
        score: dict = {}
        for r in timed:
            key = tuple(sorted((k, v) for k, v in r.items() if k in _CFG_KEYS))
            score.setdefault(key, []).append(r["us"] / best[r["N"]])
        full = {k: v for k, v in score.items() if len(v) == len(best)}
        key = min(full, key=lambda k: math.prod(full[k]))
        out[m] = dict(key)
    return out


_CFG_KEYS = ("GEMM", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "PER_SM", "EXACT", "XSUM_MMA", "GROUP_M")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    global DEVICE, SHAPES
    rows_m = (1, 16, 256) if args.quick else ROWS
    if args.cpu_smoke:
        DEVICE, SHAPES, rows_m = torch.device("cpu"), [(96, 384), (48, 384)], (1, 7, 33)
    t_start = time.time()
    info = run_info()
    if DEVICE.type != "cuda":
        info["device"] = "cpu (interpreter)"
    if DEVICE.type == "cuda":
        tasks = [(n, k, m, cfg) for n, k in SHAPES for m in rows_m for cfg in candidates(m)]
        info["compile_s"] = precompile(tasks, args.jobs)
    info["copy_TBps"] = copy_tbps()
    print(info, flush=True)
    rows = [info]
    try:
        for n, k in SHAPES:
            sweep_shape(n, k, rows_m, rows, info["copy_TBps"])
        configs = best_configs(rows[1:])
        print("CONFIGS = {")
        for m, cfg in configs.items():
            print(f"    {m}: dict({', '.join(f'{k}={v}' for k, v in cfg.items())}),")
        print("}")
        rows.append({"op": "configs", "configs": {str(m): c for m, c in configs.items()}})
    finally:
        save_rows(os.path.join(args.out, "awq_sweep.json"), rows)
        print(f"total {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

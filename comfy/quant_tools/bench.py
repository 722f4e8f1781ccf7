"""``python -m comfy.quant bench``: int4 layers and a whole Qwen-Image model against bf16 and FP8, in one run.

Sections: ``awq`` (AWQ W4A16 modulation linears, with the share of the copy bandwidth they reach),
``w4a4`` (SVDQuant W4A4 block linears: the four Qwen-Image block shapes, q/k/v as three grouped
members, and a Flux-sized K-split ``linear2``; LoRAs appended), ``model`` (a Qwen-Image transformer
in bf16, FP8 and int4, and int4 with a LoRA on every block linear) and ``lora`` (load + patch,
strength change and unpatch of that LoRA). Every int4 layer runs through the host's
``MixedPrecisionOps.Linear``: "int4" is the default kernel choice (``kernels.forced("auto")``),
"kitchen" is comfy-kitchen's path (``kernels.forced("kitchen")``). bf16 is ``F.linear``; FP8 linears
are ``torch._scaled_mm`` on already-FP8 inputs with per-tensor scales (the GEMM alone); the FP8 model
runs its block linears as upstream ComfyUI runs a ``float8_e4m3fn`` layer (``Fp8Linear``). bf16 and FP8
are measured in the same run as int4, and every row carries the device and the date. On CUDA the
suite runs at Qwen-Image's sizes; on the CPU (or ``small=True``) a small one, in seconds.
"""
from __future__ import annotations

import datetime
import functools
import gc
import importlib.metadata
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.ops
import comfy.quant_ops  # noqa: F401  (the host's kitchen backend set-up, as ComfyUI imports it)
import comfy.sd
from comfy.quant import formats, kernels, kitchen
from comfy.quant.deltas import LowRankDelta
from comfy.quant.packing import pack_int4, unpack_int4
from comfy.quant_tools.quantizer import AWQ, BLOCK, JOINT, JOINT_MEMBERS, SVDQUANT_SINGLE, UNSIGNED

logger = logging.getLogger(__name__)

SECTIONS = ("awq", "w4a4", "model", "lora")
BF16, FP32 = torch.bfloat16, torch.float32
FP8_MAX = 448.0
GRAPH_CALLS = 10    # calls captured in one CUDA graph
MIN_EVENTS = 30     # timed calls when a callable cannot be captured
MAX_COPIES = 32     # weight/input copies cycled through, so that L2 does not hold them
TIME_CAP_S = 3.0    # about the longest one measurement's timed calls may take (slow ones get fewer repeats)
MIN_REPEATS = 3     # ... but never fewer than this
GIB = 1 << 30
QUANTIZED = JOINT_MEMBERS | SVDQUANT_SINGLE | AWQ   # the 14 int4 linears of a block
COPY_BYTES = 1 << 28  # the copy that measures the memory bandwidth (overflows any L2)
MODEL_KEYS = ("forward_ms", "host_ms", "peak_gib", "weights_gib")  # a model row's measured values


@dataclass(frozen=True)
class W4A4Case:
    """One W4A4 block of the table: ``members`` linears ``k`` → ``n`` on one input (more than one: siblings
    run as the model runs q/k/v, one ``run_linear_group`` call), ``act`` their activations' signedness
    (a bool, or ``((width, unsigned), ...)`` for an input-split layer), timed at ``ms`` (empty: the suite's
    ``w4a4_m``). ``role``: "shape" for Qwen-Image's block shapes, "ksplit" for Flux's ``linear2``."""
    name: str
    k: int
    n: int
    act: object = False
    members: int = 1
    ms: tuple = ()
    role: str = "shape"

    @property
    def n_total(self) -> int:
        return self.n * self.members


@dataclass(frozen=True)
class Suite:
    awq: tuple                 # (K, N) of the modulation linear
    awq_m: tuple
    w4a4: tuple                # W4A4Case, in table order
    w4a4_m: tuple
    big_m: int                 # the M of the large-M targets (4096 image tokens at 1024²)
    mid_m: int                 # the M of its mid-size targets
    awq_small_m: int = 16      # AWQ rows up to this M are held to the bandwidth target
    ranks: tuple = (32, 128)
    loras: tuple = (0, 1, 2)
    lora_rank: int = 64
    model: dict = field(default_factory=dict)   # QwenImageTransformer2DModel kwargs ({}: the full size)
    latent: int = 128          # latent H = W: (latent / 2)² image tokens
    text_tokens: int = 256
    model_rank: int = 32
    iters: int = 20            # graph replays / timed calls per linear
    model_iters: int = 5       # timed forwards, after 2 warm-ups


def _cases(d, mlp, split_m) -> tuple:
    """The W4A4 cases at model width ``d`` and MLP width ``mlp``: Qwen-Image's four block shapes and a
    Flux-sized K-split ``linear2`` (attention out, signed, then MLP out, unsigned) at ``split_m`` rows."""
    return (W4A4Case("w4a4 attn out", d, d), W4A4Case("w4a4 q/k/v grouped", d, d, members=3),
            W4A4Case("w4a4 mlp up", d, mlp), W4A4Case("w4a4 mlp down unsigned", mlp, d, True),
            W4A4Case(f"flux linear2 K-split ({d} signed + {mlp} unsigned)", d + mlp, d,
                     ((d, False), (mlp, True)), ms=(split_m,), role="ksplit"))


FULL = Suite(awq=(3072, 18432), awq_m=(1, 2, 8, 16, 256, 1024, 4096), w4a4=_cases(3072, 12288, 4096),
             w4a4_m=(256, 1024, 4096), big_m=4096, mid_m=1024)
SMALL = Suite(awq=(256, 1536), awq_m=(1, 8), w4a4=_cases(256, 1024, 64), w4a4_m=(16, 64), big_m=64, mid_m=16,
              model=dict(num_layers=2, num_attention_heads=2, joint_attention_dim=256), latent=16, text_tokens=16,
              iters=5)


# ---- timing ----
def time_us(calls, iters, device) -> tuple[float, str]:
    """Median µs per call cycling through ``calls`` (callables on distinct buffers), and the method used.
    Slow calls (kitchen's at large M) get fewer repeats, so that no measurement takes much over
    ``TIME_CAP_S``."""
    for fn in calls:  # warm-up: every buffer, every first-call path (Triton compiles and tunes here)
        fn()
    call_s = _seconds(lambda: [fn() for fn in calls], device)[0] / len(calls)  # compiled now: a call's cost
    if device.type != "cuda":
        return _median(calls, _capped(iters, call_s, 1), device), "perf_counter"
    try:
        return _median_graph(calls, _capped(iters, call_s, max(GRAPH_CALLS, len(calls))), device), "graph"
    except Exception as e:  # a host sync or a CPU-side decision inside: time it uncaptured
        logger.info("CUDA graph capture failed (%s: %s); timing with CUDA events", type(e).__name__, e)
        torch.cuda.synchronize(device)
        return _median(calls, _capped(max(iters, MIN_EVENTS), call_s, 1), device), "events"


def _capped(iters, call_s, calls_per_iter) -> int:
    """``iters`` cut down where they would take longer than ``TIME_CAP_S``, to no fewer than ``MIN_REPEATS``
    (or ``iters``, if that is fewer)."""
    return max(min(iters, MIN_REPEATS), min(iters, int(TIME_CAP_S / max(call_s * calls_per_iter, 1e-9))))


def _median(calls, iters, device) -> float:
    """Median µs of single calls: CUDA events around each on CUDA, ``time.perf_counter`` on the CPU."""
    times = []
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[i % len(calls)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            times.append(_seconds(calls[i % len(calls)], device)[0] * 1e6)
    return statistics.median(times)


def _median_graph(calls, replays, device) -> float:
    n = max(GRAPH_CALLS, len(calls))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # torch's capture recipe: warm up on a side stream first
        for fn in calls:
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # the outer context puts the current stream back even when a failed capture skips the graph's own exit
    with torch.cuda.stream(torch.cuda.current_stream(device)), torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    return _median([graph.replay], replays, device) / n


def copies(nbytes, device) -> int:
    """How many copies of a call's buffers to cycle through so that together they overflow L2 twice."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(MAX_COPIES, math.ceil(2 * l2 / max(nbytes, 1))))


def copy_gbps(iters, device) -> float:
    """Memory bandwidth as a large device copy sees it: GB/s of bytes read plus bytes written."""
    nbytes = COPY_BYTES if device.type == "cuda" else 1 << 22
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us, _ = time_us([functools.partial(dst.copy_, src)], iters, device)
    return 2 * nbytes / (us * 1e3)


def _seconds(fn, device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- random layers, built on the generator's device ----
def _uniform(shape, lo, hi, g, dtype=BF16):
    return (torch.rand(shape, generator=g, device=g.device) * (hi - lo) + lo).to(dtype)


def _normal(shape, std, g, dtype=BF16):
    return (torch.randn(shape, generator=g, device=g.device) * std).to(dtype)


def _act_config(act) -> dict:
    """The ``comfy_quant`` signedness entries of an activation spec: a bool, or ``((width, unsigned), ...)``
    for an input-split layer (``in_splits``, formats.md)."""
    if isinstance(act, tuple):
        return {"act_unsigned": [bool(u) for _, u in act], "in_splits": [w for w, _ in act]}
    return {"act_unsigned": bool(act)}


def svdquant_tensors(n, k, rank, g, act_unsigned=False, shared=None) -> dict:
    """Random SVDQuant W4A4 layer tensors; ``act_unsigned`` as ``_act_config`` takes it; ``shared`` (a dict,
    filled on first use) hands one smoothing and ``proj_down`` to siblings that quantize one activation (q/k/v)."""
    shared = {} if shared is None else shared
    if not shared:
        shared.update(weight_smooth_factor=_uniform((k,), 0.5, 1.5, g), weight_proj_down=_normal((k, rank), 0.05, g))
    conf = {"format": "svdquant_w4a4", "rank": rank, "group_size": 64, **_act_config(act_unsigned)}
    return {"weight": pack_int4(torch.randint(-8, 8, (n, k), generator=g, device=g.device)),
            "weight_scale": _uniform((k // 64, n), 0.005, 0.025, g), "weight_proj_up": _normal((n, rank), 0.05, g),
            **shared, "comfy_quant": formats.encode_config(conf)}


def awq_tensors(n, k, g, group=64) -> dict:
    """Random AWQ W4A16 layer tensors (zero points about −scale/2, as a quantizer's are)."""
    scale = _uniform((k // group, n), 0.005, 0.025, g, FP32)
    return {"weight": pack_int4(torch.randint(0, 16, (n, k), generator=g, device=g.device)),
            "weight_scale": scale.to(BF16),
            "weight_zeros": (-0.5 * scale + _normal(scale.shape, 0.002, g, FP32)).to(BF16),
            "comfy_quant": formats.encode_config({"format": "awq_w4a16", "group_size": group})}


def int4_linear(tensors, n, k, g):
    """An int4 linear with a bias, loaded as a checkpoint's layer is: the host's ``MixedPrecisionOps.Linear``."""
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=BF16).Linear(k, n, device=g.device)
    sd = {f"l.{key}": t for key, t in {**tensors, "bias": _normal((n,), 0.1, g)}.items()}
    lin._load_from_state_dict(sd, "l.", {}, True, [], [], [])
    return lin


class LinearGroup(torch.nn.Module):
    """Sibling linears on one input, called as the model calls q/k/v: one ``comfy.ops.run_linear_group``
    (the activation quantized once where the format can share it)."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x):
        return comfy.ops.run_linear_group(x, tuple(self.members))


def members(layer) -> list:
    """The linears of a table layer: a group's members, or the layer itself."""
    return list(layer.members) if isinstance(layer, LinearGroup) else [layer]


def w4a4_layer(case, rank, g):
    """``case``'s int4 layer: one linear, or its members on one shared smoothing and ``proj_down``."""
    shared = {}
    made = [int4_linear(svdquant_tensors(case.n, case.k, rank, g, case.act, shared), case.n, case.k, g)
            for _ in range(case.members)]
    return made[0] if case.members == 1 else LinearGroup(made)


def _stored(t) -> list:
    """The tensors holding ``t``'s data: an int4 weight's codes and side tensors, or ``t`` itself."""
    if not isinstance(t, kitchen.QuantizedTensor):
        return [t]
    p = t._params
    return [t._qdata] + [v for f in p._tensor_fields() if isinstance(v := getattr(p, f), torch.Tensor)]


def weight_bytes(tensors) -> int:
    """Bytes of ``tensors`` (parameters, int4 weights), each stored tensor counted once."""
    return sum({(s.data_ptr(), s.numel()): s.numel() * s.element_size() for t in tensors for s in _stored(t)}.values())


def copied_layers(make, extra_bytes, device) -> list:
    """``make()`` called as often as ``copies`` asks for one layer plus ``extra_bytes`` of input."""
    first = make()
    return [first] + [make() for _ in range(copies(weight_bytes(first.parameters()) + extra_bytes, device) - 1)]


def awq_dequantized(lin) -> torch.Tensor:
    """The bf16 weight an AWQ layer stands for: ``(q − 8)·scale + zeros`` per group (formats.md §2)."""
    p = lin.weight._params
    scale, zeros = (t.float().repeat_interleave(p.group_size, 0).t() for t in (p.scale, p.zeros))
    return ((unpack_int4(lin.weight._qdata, signed=False) - 8) * scale + zeros).to(BF16)


# ---- linear rows ----
def _inputs(m, k, count, g, act=False) -> list:
    """``count`` (m, k) inputs; the parts ``act`` marks unsigned are post-GELU activations (what such a
    layer reads), the others standard normal."""
    parts = act if isinstance(act, tuple) else ((k, act),)
    def one():
        return torch.cat([F.gelu(x) if unsigned else x for x, unsigned in
                          ((_normal((m, w), 1.0, g), unsigned) for w, unsigned in parts)], 1)
    return [one() for _ in range(count)]


def _fp8(t):
    scale = (t.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_calls(ws, bs, xs) -> tuple[list, str]:
    """``torch._scaled_mm`` calls on FP8 copies of ``ws`` and ``xs``, and a note; ``([], reason)`` without FP8."""
    if not hasattr(torch, "float8_e4m3fn"):
        return [], "no float8 dtype in this torch"
    wq, m, reason = [_fp8(w) for w in ws], xs[0].shape[0], ""
    for rows in dict.fromkeys((m, -(-m // 16) * 16)):  # as is, then M padded to a multiple of 16
        xq = [_fp8(F.pad(x, (0, 0, 0, rows - m))) for x in xs]
        calls = [functools.partial(torch._scaled_mm, xq[i % len(xq)][0], w.t(), scale_a=xq[i % len(xq)][1],
                                   scale_b=s, bias=b, out_dtype=BF16) for i, ((w, s), b) in enumerate(zip(wq, bs))]
        try:
            calls[0]()
            return calls, "" if rows == m else f"fp8 M padded to {rows}"
        except (RuntimeError, TypeError) as e:
            reason = f"fp8 n/a: {str(e).splitlines()[0][:80]}"
    return [], reason


def float_times(ws, bs, xs, iters, device) -> dict:
    """bf16 ``F.linear`` and FP8 GEMM times for weights ``ws`` (biases ``bs``) on inputs ``xs``, cycled."""
    calls = [functools.partial(F.linear, xs[i % len(xs)], w, b) for i, (w, b) in enumerate(zip(ws, bs))]
    bf16, bf16_method = time_us(calls, iters, device)
    fp8, note = fp8_calls(ws, bs, xs) if device.type == "cuda" else ([], "")  # CPU _scaled_mm: a reference loop
    fp8_us, fp8_method = time_us(fp8, iters, device) if fp8 else (None, "n/a")
    return {"bf16_us": bf16, "fp8_us": fp8_us, "methods": {"bf16": bf16_method, "fp8": fp8_method}, "note": note}


def project_kernel(layer, x):
    """Whether the default choice runs the project's kernel (not kitchen's) for ``layer(x)``."""
    weight = members(layer)[0].weight
    with kernels.forced("auto"):
        fmt = formats.format_of(weight).name
        mod = kernels.w4a4_kernel(x.device) if fmt == "svdquant_w4a4" else kernels.awq_kernel(x.device, x.shape[0])
        return mod is not None and mod.supports(x, weight)


def ratio(a, b):
    """``a / b`` of two measured values, None where either is missing."""
    return None if a is None or not b else a / b


def linear_row(base, layers, xs, floats, iters, device) -> dict:
    """One table row: ``layer(x)`` under kitchen's kernels and under the default choice, next to ``floats``;
    ratios are int4's time over the others' (< 1: int4 faster) and its stored bytes over bf16's."""
    calls = [functools.partial(lin, x) for lin, x in zip(layers, xs)]
    with kernels.forced("kitchen"):
        kit, kit_method = time_us(calls, iters, device)
    project = project_kernel(layers[0], xs[0])
    with kernels.forced("auto"):  # where the default choice is kitchen's kernel, it is the same measurement
        int4, method = time_us(calls, iters, device) if project else (kit, kit_method)
    bf16_bytes = (base["K"] + 1) * base["N"] * 2  # weight and bias
    return {**base, "int4_us": int4, "kitchen_us": kit, **floats, "int4_kernel": "project" if project else "kitchen",
            "methods": {"int4": method, "kitchen": kit_method, **floats["methods"]},
            "int4/bf16": ratio(int4, floats["bf16_us"]), "int4/fp8": ratio(int4, floats["fp8_us"]),
            "int4/kitchen": ratio(int4, kit), "weights/bf16": weight_bytes(layers[0].parameters()) / bf16_bytes}


def bandwidth(row, layer, gbps) -> dict:
    """The bytes one call must move (the layer's stored tensors, its bf16 input and output), the µs they need
    at the measured copy bandwidth, and that time as a share of the int4 call's (``bw_pct``)."""
    moved = weight_bytes(layer.parameters()) + row["M"] * (row["K"] + row["N"]) * 2
    bytes_us = moved / (gbps * 1e3)
    return {"copy_gbps": gbps, "moved_bytes": moved, "bytes_us": bytes_us, "bw_pct": 100 * bytes_us / row["int4_us"]}


def bench_awq(suite, device, iters, g) -> list:
    k, n = suite.awq
    layers = copied_layers(lambda: int4_linear(awq_tensors(n, k, g), n, k, g), 0, device)
    dense = layers[:copies(n * k, device)]  # as many as FP8 needs (bf16 needs fewer)
    ws, bs = [awq_dequantized(lin) for lin in dense], [lin.bias for lin in dense]
    gbps, rows = copy_gbps(iters, device), []
    for m in suite.awq_m:
        logger.info("awq_w4a16 M=%d %d->%d (%d copies)", m, k, n, len(layers))
        xs = _inputs(m, k, len(layers), g)
        base = {"section": "awq", "case": "awq_w4a16 g64", "role": "awq", "members": 1, "M": m, "K": k, "N": n,
                "rank": None, "loras": 0}
        row = linear_row(base, layers, xs, float_times(ws, bs, xs, iters, device), iters, device)
        rows.append({**row, **bandwidth(row, layers[0], gbps)})
    return rows


def lora_deltas(layer, count, rank, g) -> list:
    """``count`` rank-``rank`` LoRAs for a table layer, each a list with one delta per member: its own
    factors, as a LoRA file has one ``lora_A`` / ``lora_B`` pair for each of q, k and v."""
    n, k = members(layer)[0].weight.shape
    return [[LowRankDelta(_normal((n, rank), 0.01, g, FP32), _normal((rank, k), 0.01, g, FP32))
             for _ in members(layer)] for _ in range(count)]


def land_loras(layers, bases, deltas):
    """Every layer's members rebuilt from their ``bases`` (their unpatched weights) with the LoRAs ``deltas``
    landed in one ``apply_deltas`` call per group, as the model patcher lands a set of LoRAs
    (``comfy.quant.patching.patch_weight``)."""
    for layer, base in zip(layers, bases):
        linears = members(layer)
        for lin, weight in zip(linears, base):
            lin.weight = weight
        if deltas:
            formats.format_of(base[0]).apply_deltas([(lin, [lora[i] for lora in deltas])
                                                     for i, lin in enumerate(linears)])


def _float_shape(m, k, n, iters, device, g) -> dict:
    """bf16 and FP8 of one (m, k, n) GEMM, on as many weight copies as FP8's bytes need."""
    ws = [_normal((n, k), k ** -0.5, g) for _ in range(copies((n + m) * k, device))]
    return float_times(ws, [_normal((n,), 0.1, g) for _ in ws], _inputs(m, k, len(ws), g), iters, device)


def _w4a4_rows(case, rank, suite, floats, iters, device, g) -> list:
    ms, rows = case.ms or suite.w4a4_m, []
    layers = copied_layers(lambda: w4a4_layer(case, rank, g), min(ms) * case.k * 2, device)
    bases = [[lin.weight for lin in members(layer)] for layer in layers]
    deltas = lora_deltas(layers[0], max(suite.loras), suite.lora_rank, g)
    k, n = case.k, case.n_total
    for loras in suite.loras:
        land_loras(layers, bases, deltas[:loras])
        for m in ms:
            logger.info("%s M=%d %d->%d r%d + %d LoRA (%d copies)", case.name, m, k, n, rank, loras, len(layers))
            if (m, k, n) not in floats:  # bf16 / FP8 once per shape, reused across ranks and LoRAs
                floats[m, k, n] = _float_shape(m, k, n, iters, device, g)
            base = {"section": "w4a4", "case": case.name, "role": case.role, "members": case.members, "M": m,
                    "K": k, "N": n, "rank": rank, "loras": loras}
            rows.append(linear_row(base, layers, _inputs(m, k, len(layers), g, case.act), floats[m, k, n], iters,
                                   device))
    return rows


def bench_w4a4(suite, device, iters, g) -> list:
    rows, floats = [], {}
    for case in suite.w4a4:
        for rank in suite.ranks:
            rows += _w4a4_rows(case, rank, suite, floats, iters, device, g)
            _free(device)
    order = {case.name: i for i, case in enumerate(suite.w4a4)}
    return sorted(rows, key=lambda r: (order[r["case"]], r["M"], r["rank"], r["loras"]))


# ---- the model ----
def _meta_shapes(suite) -> dict:
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**suite.model, operations=comfy.ops.disable_weight_init, device="meta")
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def _block_linear(key):
    """``(block prefix, layer)`` when ``key`` is the weight of one of a block's int4 linears, else None."""
    m = BLOCK.match(key)
    layer = m and m.group(2).removesuffix(".weight")
    return (m.group(1), layer) if m and key.endswith(".weight") and layer in QUANTIZED else None


def _float_init(key, shape, g):
    if len(shape) == 2:
        return _normal(shape, shape[1] ** -0.5, g)
    return _normal(shape, 0.02, g) if key.endswith("bias") else (1 + _normal(shape, 0.1, g, FP32)).to(BF16)


def int4_state_dict(shapes, rank, g) -> dict:
    """A random int4 Qwen-Image checkpoint (block linears int4 as the quantizer lays them out, the rest bf16),
    generated on ``g``'s device tensor by tensor and handed over on the CPU, where the loader builds the model."""
    sd, shared = {}, {}
    for key, shape in shapes.items():
        hit = _block_linear(key)
        if hit is None:
            sd[key] = _float_init(key, shape, g).cpu()
            continue
        (block, layer), (n, k) = hit, shape
        lead = next((lead for lead, group in JOINT.items() if layer in group), layer)
        tensors = awq_tensors(n, k, g) if layer in AWQ else svdquant_tensors(
            n, k, rank, g, layer in UNSIGNED, shared.setdefault((block, lead), {}))
        sd.update({f"{block}.{layer}.{name}": t.cpu() for name, t in tensors.items()})
    return sd


def bf16_model(suite, device, g):
    """The same transformer with random bf16 weights (std 1/sqrt(K)), built on ``device``."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**suite.model, operations=comfy.ops.disable_weight_init, dtype=BF16,
                                        device=device)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            t.copy_(_float_init(key, tuple(t.shape), g))
    return model


class Fp8Linear(torch.nn.Module):
    """A linear as upstream ComfyUI stores and runs a ``comfy_quant`` "float8_e4m3fn" layer: ``weight`` e4m3
    codes with one fp32 ``weight_scale`` (amax / 448), a static fp32 ``input_scale`` (the file's; 1.0 where a
    file has none, as upstream then quantizes), the input quantized per call by kitchen's
    ``quantize_per_tensor_fp8`` and ``torch._scaled_mm`` with per-tensor scales. Built in the bench (this
    host's ``MixedPrecisionOps`` loads int4 formats only) and calling ``torch._scaled_mm`` directly: kitchen's
    own FP8 ``addmm`` would fall back to dequantized bf16 without a word if the GEMM failed."""

    def __init__(self, linear, input_scale=1.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax().float() / FP8_MAX
        self.weight = torch.nn.Parameter(kitchen.ck.quantize_per_tensor_fp8(w, scale, torch.float8_e4m3fn),
                                         requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", torch.tensor(float(input_scale), device=w.device))
        self.bias = linear.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # upstream quantizes >2-D inputs as 2-D, row-major
        xq = kitchen.ck.quantize_per_tensor_fp8(flat, self.input_scale, torch.float8_e4m3fn)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def to_fp8(model) -> int:
    """Swap the block linears the int4 model quantizes (all 14 of each block) for ``Fp8Linear`` copies,
    one at a time so that each bf16 weight is dropped as its FP8 copy lands; returns how many."""
    names = [key.removesuffix(".weight") for key in model.state_dict() if _block_linear(key)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Fp8Linear(getattr(owner, child)))
    return len(names)


def float_model_rows(suite, inputs, iters, device, g) -> list:
    """bf16, then the same weights with the block linears in FP8: one model at a time, freed by the caller.
    An FP8 GEMM this torch or device refuses leaves the FP8 row unmeasured, with the reason."""
    logger.info("building the bf16 model")
    model = bf16_model(suite, device, g)
    rows = [model_row("bf16", "bf16", model, inputs, iters, device)]
    logger.info("converting its block linears to FP8")
    name = f"fp8 (e4m3 on {to_fp8(model)} block linears)"
    try:
        return rows + [model_row("fp8", name, model, inputs, iters, device)]
    except (RuntimeError, TypeError) as e:
        reason = f"fp8 n/a: {str(e).splitlines()[0][:80]}"
        logger.warning("FP8 model not measured: %s", reason)
        return rows + [{"section": "model", "kind": "fp8", "model": name, "error": reason,
                        **dict.fromkeys(MODEL_KEYS)}]


def lora_state_dict(shapes, rank, g) -> dict:
    """A diffusers-format LoRA of rank ``rank`` on every int4 linear of every block, on the CPU."""
    sd = {}
    for key in filter(_block_linear, shapes):
        (n, k), prefix = shapes[key], "transformer." + key.removesuffix(".weight")
        sd[f"{prefix}.lora_A.weight"] = _normal((rank, k), k ** -0.5, g).cpu()
        sd[f"{prefix}.lora_B.weight"] = _normal((n, rank), 0.1 * rank ** -0.5, g).cpu()
        sd[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return sd


def _forward_ms(model, inputs, device) -> tuple[float, float]:
    """(ms to the end of the forward's GPU work, ms until the Python call returned): equal when the host
    is what limits the forward."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model(*inputs)
    t1 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3, (t1 - t0) * 1e3


def model_row(kind, name, model, inputs, iters, device) -> dict:
    """Median forward ms (after 2 warm-ups), peak memory while running and weight memory of ``model``."""
    with torch.no_grad():
        for _ in range(2):
            model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        runs = [_forward_ms(model, inputs, device) for _ in range(iters)]
    return {"section": "model", "kind": kind, "model": name, "forward_ms": statistics.median(r[0] for r in runs),
            "host_ms": statistics.median(r[1] for r in runs),
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
            "weights_gib": weight_bytes([*model.parameters(), *model.buffers()]) / GIB}


def _apply_lora(patcher, lora_sd, strength, device):
    """A LoRA from a state dict in memory, as ``LoraLoaderModelOnly`` and then a sampler apply it."""
    lora = comfy.sd.load_lora_for_models(patcher, None, lora_sd, strength, 0)[0]
    lora.patch_model(device_to=device)
    return lora


def int4_model_rows(patcher, lora_sd, inputs, suite, iters, device) -> list:
    model = patcher.model.diffusion_model
    base = model_row("int4", "int4", model, inputs, iters, device)
    lora = _apply_lora(patcher, lora_sd, 1.0, device)
    with_lora = model_row("int4+lora", f"int4 + LoRA r{suite.lora_rank} on {len(lora.patches)} layers", model,
                          inputs, iters, device)
    lora.unpatch_model()
    return [base, {**with_lora, "lora_overhead_pct": 100 * (with_lora["forward_ms"] / base["forward_ms"] - 1)}]


def _bits(t):
    return t.detach().contiguous().view(torch.uint8)


def lora_timings(patcher, lora_sd, inputs, device, strengths=(1.0, 0.5)) -> dict:
    """Seconds to load + patch a LoRA, change its strength (a new clone, re-patched) and unpatch; and
    whether the base model is restored exactly afterwards."""
    model = patcher.model.diffusion_model
    with torch.no_grad():
        before, again = model(*inputs), model(*inputs)
    kept = [(m, _stored(m.weight)) for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    load_s, lora = _seconds(lambda: _apply_lora(patcher, lora_sd, strengths[0], device), device)
    strength_s, lora = _seconds(lambda: _apply_lora(patcher, lora_sd, strengths[1], device), device)
    unpatch_s, _ = _seconds(lora.unpatch_model, device)
    with torch.no_grad():
        after = model(*inputs)
    same = all(len(ts) == len(_stored(m.weight)) and all(a is b for a, b in zip(ts, _stored(m.weight)))
               for m, ts in kept)
    return {"layers": len(lora.patches), "strengths": list(strengths), "load_patch_s": load_s,
            "strength_change_s": strength_s, "unpatch_s": unpatch_s, "tensors_restored": same,
            "restored_bit_exact": torch.equal(_bits(before), _bits(after)),
            "base_deterministic": torch.equal(_bits(before), _bits(again))}


def bench_model(suite, sections, device, iters, g) -> tuple[list, dict, str]:
    shapes = _meta_shapes(suite)
    inputs = (_normal((1, 16, 1, suite.latent, suite.latent), 1.0, g), torch.full((1,), 0.6, device=device),
              _normal((1, suite.text_tokens, shapes["txt_norm.weight"][0]), 1.0, g))
    blocks = len({BLOCK.match(k).group(1) for k in filter(BLOCK.match, shapes)})
    desc = (f"{blocks} blocks, dim {shapes['img_in.weight'][0]}, {(suite.latent // 2) ** 2} image + "
            f"{suite.text_tokens} text tokens, batch 1, bf16; int4: svdquant_w4a4 rank {suite.model_rank}, "
            "awq_w4a16 modulation, the rest bf16; fp8: the bf16 model's weights with the same block linears "
            "as upstream's float8_e4m3fn layers (e4m3 weight, per-tensor weight scale, static input scale 1.0, "
            "input quantized by kitchen), built in the bench (this host loads int4 formats only) and run by "
            "torch._scaled_mm directly")
    rows, lora = [], {}
    if "model" in sections:  # bf16 and FP8 first, then freed: no two models resident at once
        rows += float_model_rows(suite, inputs, iters, device, g)
        _free(device)
    logger.info("building the int4 model through the loader")
    patcher = comfy.sd.load_diffusion_model_state_dict(int4_state_dict(shapes, suite.model_rank, g),
                                                       model_options={"dtype": BF16, "load_device": device})
    patcher.patch_model(device_to=device)
    lora_sd = lora_state_dict(shapes, suite.lora_rank, g)
    if "model" in sections:
        rows += int4_model_rows(patcher, lora_sd, inputs, suite, iters, device)
    if "lora" in sections:
        lora = lora_timings(patcher, lora_sd, inputs, device)
    return rows, lora, desc


# ---- the run and its report ----
def _version(name) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run_info(device) -> dict:
    cuda = device.type == "cuda"
    with kernels.forced("auto"):
        chosen = kernels.describe(device)
    reason = kernels.unavailable_reason("triton_w4a4") or kernels.unavailable_reason("triton_awq")
    note = "" if "triton" in chosen.values() else "the int4 column is kitchen's: " + (
        f"the project's kernels are unavailable ({reason})" if reason else "the default choice on this device")
    return {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else "n/a",
            "torch": _version("torch"), "triton": _version("triton"), "comfy-kitchen": _version("comfy-kitchen"),
            "python": platform.python_version(), "date": datetime.date.today().isoformat(), "kernels": chosen,
            "kernel_note": note}


def run_bench(small=False, sections=SECTIONS, iters=None, device=None) -> dict:
    """Every selected section, in this process → ``{"info", "rows", "lora", ...}`` (``format_report`` prints it).
    Every row carries the run's device and date."""
    device = torch.device(device) if device else comfy.model_management.get_torch_device()
    suite = SMALL if small or device.type != "cuda" else FULL
    g = torch.Generator(device=device).manual_seed(0)
    info, t0 = run_info(device), time.perf_counter()
    rows, lora, desc = [], {}, ""
    if "awq" in sections:
        rows += bench_awq(suite, device, iters or suite.iters, g)
    if "w4a4" in sections:
        rows += bench_w4a4(suite, device, iters or suite.iters, g)
    _free(device)
    if "model" in sections or "lora" in sections:
        with kernels.forced("auto"):  # the kernels the header names, whatever COMFY_INT4_KERNELS says
            model_rows, lora, desc = bench_model(suite, sections, device, iters or suite.model_iters, g)
        rows += model_rows
    return {"info": info, "suite": "small" if suite is SMALL else "full",
            "rows": [{**r, "device": info["device"], "date": info["date"]} for r in rows], "lora": lora,
            "model": desc, "model_iters": iters or suite.model_iters, "lora_rank": suite.lora_rank,
            "target_m": {"big": suite.big_m, "mid": suite.mid_m, "awq_small": suite.awq_small_m},
            "seconds": time.perf_counter() - t0}


# ---- the report ----
def _num(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def _table(head, rows) -> list:
    return [f"| {' | '.join(head)} |", "|" + "---|" * len(head)] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def _run(r) -> str:
    return f"{r['device'].removeprefix('NVIDIA ')} · {r['date']}"


def _shape(r) -> str:
    n = r["N"] // r["members"]
    return f"{r['K']}→{r['N']}" if r["members"] == 1 else f"{r['K']}→{r['members']}×{n}"


def _method(r, mark_kitchen) -> str:
    used = set(r["methods"].values()) - {"n/a"}
    text = used.pop() if len(used) == 1 else "/".join(r["methods"].values()) + " (int4/kitchen/bf16/fp8)"
    if r["note"]:
        text += f"; {r['note']}"
    if mark_kitchen and r["int4_kernel"] == "kitchen":
        text += "; int4 = kitchen's kernel"
    return text


def _linear_table(rows, mark_kitchen) -> list:
    awq = rows[0]["section"] == "awq"
    head = ("case", "M", "K→N", "rank", "LoRAs", "int4 µs", "kitchen µs", "bf16 µs", "fp8 µs", "int4/bf16",
            "int4/fp8", "int4/kitchen") + (("bytes µs", "% copy bw") if awq else ()) + ("method", "device · date")
    return _table(head, [(r["case"], r["M"], _shape(r), r["rank"] or "–", r["loras"],
                          *(_num(r[k]) for k in ("int4_us", "kitchen_us", "bf16_us", "fp8_us")),
                          *(_num(r[k], ".3f") for k in ("int4/bf16", "int4/fp8", "int4/kitchen")),
                          *((_num(r["bytes_us"]), _num(r["bw_pct"], ".0f")) if awq else ()),
                          _method(r, mark_kitchen), _run(r)) for r in rows])


def model_ratios(rows) -> dict:
    """``{"int4/bf16": {key: ratio}, "int4/fp8": ...}`` from the model rows' measured values."""
    by = {r["kind"]: r for r in rows if r["section"] == "model"}
    return {f"int4/{base}": {k: ratio(by["int4"][k], by[base][k]) for k in MODEL_KEYS}
            for base in ("bf16", "fp8") if base in by and "int4" in by}


def _model_note(r) -> str:
    if "lora_overhead_pct" in r:
        return f"{r['lora_overhead_pct']:+.1f} % LoRA overhead"
    return r.get("error", "")


def _model_table(rows) -> list:
    specs = (".1f", ".1f", ".3g", ".3g")
    cells = [(r["model"], *(_num(r[k], s) for k, s in zip(MODEL_KEYS, specs)), _model_note(r), _run(r))
             for r in rows]
    cells += [(name, *(_num(v[k], ".2f") for k in MODEL_KEYS), "", _run(rows[0]))
              for name, v in model_ratios(rows).items()]
    return _table(("model", "forward ms", "host ms (call returned)", "peak GiB", "weights GiB", "note",
                   "device · date"), cells)


def _lora_lines(lora) -> list:
    yes = lambda v: "yes" if v else "NO"  # noqa: E731
    s0, s1 = lora["strengths"]
    return _table(("step", "seconds"), [
        (f"load + patch (strength {s0})", _num(lora["load_patch_s"], ".3g")),
        (f"strength change ({s0} → {s1}: a new clone, re-patched)", _num(lora["strength_change_s"], ".3g")),
        ("unpatch", _num(lora["unpatch_s"], ".3g"))]) + [
        "", f"Base output after unpatch bit-exact: {yes(lora['restored_bit_exact'])} (base forward deterministic: "
            f"{yes(lora['base_deterministic'])}; base int4 tensors restored as the same objects: "
            f"{yes(lora['tensors_restored'])})."]


# ---- issue 17's targets, read from the run's rows ----
def _target(name, value, limit, measured, at_least=False) -> tuple:
    """``(target, measured, met)``; ``value`` None (not measured in this run) gives "–"."""
    if value is None:
        return name, measured, "–"
    return name, measured, "yes" if (value >= limit if at_least else value <= limit) else "no"


def _pick(rows, section, **match) -> list:
    return [r for r in rows if r["section"] == section and all(r.get(k) == v for k, v in match.items())]


def _vs(r, other) -> str:
    """"int4 µs / other µs = ratio×" of a linear row, or why there is no ratio."""
    if r[f"{other}_us"] is None:
        return f"int4 {_num(r['int4_us'])} µs; {other} not measured in this run"
    return f"{_num(r['int4_us'])} / {_num(r[f'{other}_us'])} µs = {r[f'int4/{other}']:.2f}×"


def _w4a4_targets(rows, m) -> list:
    """At the lowest rank, no LoRA: each block shape at the large M against FP8 and at the mid M against
    bf16; the K-split layer against bf16 (FP8 shown), and its bytes against bf16's."""
    base = _pick(rows, "w4a4", loras=0)
    base = [r for r in base if r["rank"] == min(x["rank"] for x in base)]
    at = lambda r: f"{r['case']} {_shape(r)} M {r['M']}"  # noqa: E731
    out = [_target(f"{at(r)}: int4 ≤ 1.25× FP8", r["int4/fp8"], 1.25, _vs(r, "fp8"))
           for r in base if r["role"] == "shape" and r["M"] == m["big"]]
    out += [_target(f"{at(r)}: int4 ≤ bf16", r["int4/bf16"], 1.0, _vs(r, "bf16"))
            for r in base if r["role"] == "shape" and r["M"] == m["mid"]]
    for r in (r for r in base if r["role"] == "ksplit"):
        out += [_target(f"{at(r)}: int4 ≤ bf16", r["int4/bf16"], 1.0, f"{_vs(r, 'bf16')}; {_vs(r, 'fp8')}"),
                _target(f"{at(r)}: weights ≤ 0.30× bf16", r["weights/bf16"], 0.30, f"{r['weights/bf16']:.3f}×")]
    return out


def _awq_targets(rows, small_m) -> list:
    awq = _pick(rows, "awq")
    out = [_target(f"AWQ M {r['M']} {r['K']}→{r['N']}: ≥ 60 % of the copy bandwidth", r["bw_pct"], 60,
                   f"{_num(r['int4_us'])} µs; its {r['moved_bytes'] / 1e6:.1f} MB need {_num(r['bytes_us'])} µs at "
                   f"{r['copy_gbps']:.0f} GB/s: {r['bw_pct']:.0f} %", at_least=True) for r in awq if r["M"] <= small_m]
    if awq:
        worst = max(awq, key=lambda r: r["int4/bf16"])
        each = ", ".join(f"M {r['M']}: {r['int4/bf16']:.2f}" for r in awq)
        out.append(_target("AWQ: int4 ≤ bf16 at every M", worst["int4/bf16"], 1.0, f"int4/bf16 {each}"))
    return out


def _model_targets(rows, lora) -> list:
    ratios, by, out = model_ratios(rows), {r["kind"]: r for r in _pick(rows, "model")}, []
    if "int4/bf16" in ratios:
        t, w = ratios["int4/bf16"]["forward_ms"], ratios["int4/bf16"]["weights_gib"]
        fp8 = ratios.get("int4/fp8", {}).get("forward_ms")
        out += [_target("Qwen-Image forward: int4 ≤ 1.0× bf16 (goal 0.8×)", t, 1.0,
                        f"{by['int4']['forward_ms']:.1f} / {by['bf16']['forward_ms']:.1f} ms = {t:.2f}× "
                        f"(goal {'met' if t <= 0.8 else 'not met'}; int4/fp8 {_num(fp8, '.2f')}×)"),
                _target("Qwen-Image weights: int4 ≤ 0.30× bf16", w, 0.30,
                        f"{by['int4']['weights_gib']:.3g} / {by['bf16']['weights_gib']:.3g} GiB = {w:.3f}×")]
    if "int4+lora" in by:
        pct = by["int4+lora"]["lora_overhead_pct"]
        out.append(_target(f"{by['int4+lora']['model']}: ≤ 5 % of the forward", pct, 5.0, f"{pct:+.1f} %"))
    if lora:
        out += [_target(f"LoRA load + patch on {lora['layers']} layers ≤ 1 s", lora["load_patch_s"], 1.0,
                        f"{lora['load_patch_s']:.3g} s"),
                _target(f"LoRA strength change on {lora['layers']} layers ≤ 0.5 s", lora["strength_change_s"], 0.5,
                        f"{lora['strength_change_s']:.3g} s")]
    return out


def targets(result) -> list:
    """``(target, measured, met)`` for every issue-17 target this run measured, each from its rows."""
    rows, m = result["rows"], result["target_m"]
    return _w4a4_targets(rows, m) + _awq_targets(rows, m["awq_small"]) + _model_targets(rows, result["lora"])


def _note(result, sections, cpu, command) -> str:
    note = [f"`{command}` ({result['suite']} suite, {result['seconds']:.0f} s)."]
    if sections & {"awq", "w4a4"}:
        note.append(f"Linears: median µs per call; on CUDA a CUDA graph of ≥{GRAPH_CALLS} calls replayed and timed "
                    f"with CUDA events (graph), else CUDA events around each of ≥{MIN_EVENTS} calls (events); on the "
                    f"CPU time.perf_counter; fewer repeats (≥ {MIN_REPEATS}) where they would take over "
                    f"{TIME_CAP_S:.0f} s; the calls cycle through weight/input copies that together overflow twice "
                    "the L2 cache; bf16 and FP8 of a shape are measured once for all its rows (q/k/v: one GEMM of "
                    "all three members' rows). Ratios: int4's time over the other's (< 1: int4 faster)."
                    + (" FP8 linears are timed on CUDA only." if cpu else ""))
    if "awq" in sections:
        note.append("AWQ bytes µs: the layer's stored tensors plus its bf16 input and output at the copy bandwidth "
                    f"measured in this run (a {COPY_BYTES >> 20} MiB device copy on CUDA, read + write).")
    if "model" in sections:
        note.append(f"Model: median of {result['model_iters']} forwards after 2 warm-ups (perf_counter, "
                    "synchronized); peak = max_memory_allocated during them; bf16, FP8 and int4 built one after "
                    "the other, never resident together.")
    if "lora" in sections:
        note.append("LoRA steps: one run each (perf_counter, synchronized).")
    return " ".join(note)


def format_report(result, command="python -m comfy.quant bench") -> str:
    """The report as a markdown section: a header line, one table per section, the issue-17 targets, a note."""
    info, rows = result["info"], result["rows"]
    chosen = ", ".join(f"{k} {v}" for k, v in info["kernels"].items() if k != "mode")
    out = [f"## int4 benchmark: {info['device']}, {info['date']}", "",
           f"{info['device']} · compute capability {info['capability']} · torch {info['torch']} · triton "
           f"{info['triton']} · comfy-kitchen {info['comfy-kitchen']} · python {info['python']} · {info['date']} · "
           f"kernels ({info['kernels']['mode']}): {chosen}"]
    if info["kernel_note"]:
        out += ["", f"Note: {info['kernel_note']}."]
    titles = {"awq": "AWQ W4A16 (modulation linears: int4 weights, bf16 activations)",
              "w4a4": f"SVDQuant W4A4 (block linears: int4 weights and activations; rank-{result['lora_rank']} "
                      "LoRAs appended to the low-rank branch)",
              "model": f"Qwen-Image transformer: {result['model']}"}
    for section, title in titles.items():
        part = [r for r in rows if r["section"] == section]
        if part:
            out += ["", f"### {title}", ""] + (_model_table(part) if section == "model" else
                                                _linear_table(part, not info["kernel_note"]))
    if result["lora"]:
        out += ["", f"### LoRA on the int4 model ({result['lora']['layers']} layers)", ""] + _lora_lines(result["lora"])
    goals = targets(result)
    if goals:
        out += ["", f"### Issue 17 targets ({info['device']}, {info['date']}; every figure from the rows above)", ""]
        out += _table(("target", "measured", "met"), goals)
    sections = {r["section"] for r in rows} | ({"lora"} if result["lora"] else set())
    out += ["", _note(result, sections, info["capability"] == "n/a", command)]
    return "\n".join(out) + "\n"

"""``python -m comfy.quant bench``: int4 layers and a whole Qwen-Image model against bf16 and FP8, in one run.

Sections: ``awq`` (AWQ W4A16 modulation linears), ``w4a4`` (SVDQuant W4A4 block linears, with LoRAs
appended), ``model`` (a Qwen-Image transformer, int4 vs bf16, and int4 with a LoRA on every block
linear) and ``lora`` (load + patch, strength change and unpatch of that LoRA). Every int4 layer runs
through the host's ``MixedPrecisionOps.Linear``: "int4" is the default kernel choice
(``kernels.forced("auto")``), "kitchen" is comfy-kitchen's path (``kernels.forced("kitchen")``). bf16 is
``F.linear``; FP8 is ``torch._scaled_mm`` on already-FP8 inputs with per-tensor scales (the GEMM alone).
On CUDA the suite runs at Qwen-Image's sizes; on the CPU (or ``small=True``) a small one, in seconds.
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
GIB = 1 << 30
QUANTIZED = JOINT_MEMBERS | SVDQUANT_SINGLE | AWQ   # the 14 int4 linears of a block


@dataclass(frozen=True)
class Suite:
    awq: tuple                 # (K, N) of the modulation linear
    awq_m: tuple
    w4a4: tuple                # (case, K, N, act_unsigned)
    w4a4_m: tuple
    ranks: tuple = (32, 128)
    loras: tuple = (0, 1, 2)
    lora_rank: int = 64
    model: dict = field(default_factory=dict)   # QwenImageTransformer2DModel kwargs ({}: the full size)
    latent: int = 128          # latent H = W: (latent / 2)² image tokens
    text_tokens: int = 256
    model_rank: int = 32
    iters: int = 20            # graph replays / timed calls per linear
    model_iters: int = 5       # timed forwards, after 2 warm-ups


FULL = Suite(awq=(3072, 18432), awq_m=(1, 2, 8, 16, 256), w4a4_m=(256, 1024, 4096),
             w4a4=(("w4a4", 3072, 3072, False), ("w4a4 fused qkv", 3072, 9216, False),
                   ("w4a4 mlp up", 3072, 12288, False), ("w4a4 mlp down unsigned", 12288, 3072, True)))
SMALL = Suite(awq=(256, 1536), awq_m=(1, 8), w4a4_m=(16, 64),
              w4a4=(("w4a4", 256, 256, False), ("w4a4 fused qkv", 256, 768, False),
                    ("w4a4 mlp up", 256, 1024, False), ("w4a4 mlp down unsigned", 1024, 256, True)),
              model=dict(num_layers=2, num_attention_heads=2, joint_attention_dim=256), latent=16, text_tokens=16,
              iters=5)


# ---- timing ----
def time_us(calls, iters, device) -> tuple[float, str]:
    """Median µs per call cycling through ``calls`` (callables on distinct buffers), and the method used."""
    for fn in calls * 2:  # warm-up: every buffer, every first-call path (Triton compiles and tunes here)
        fn()
    if device.type != "cuda":
        return _median(calls, iters, device), "perf_counter"
    torch.cuda.synchronize(device)
    try:
        return _median_graph(calls, iters, device), "graph"
    except Exception as e:  # a host sync or a CPU-side decision inside: time it uncaptured
        logger.info("CUDA graph capture failed (%s: %s); timing with CUDA events", type(e).__name__, e)
        torch.cuda.synchronize(device)
        return _median(calls, max(iters, MIN_EVENTS), device), "events"


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


def svdquant_tensors(n, k, rank, g, act_unsigned=False, shared=None) -> dict:
    """Random SVDQuant W4A4 layer tensors; ``shared`` (a dict, filled on first use) hands one smoothing
    and ``proj_down`` to siblings that quantize one activation (q/k/v)."""
    shared = {} if shared is None else shared
    if not shared:
        shared.update(weight_smooth_factor=_uniform((k,), 0.5, 1.5, g), weight_proj_down=_normal((k, rank), 0.05, g))
    conf = {"format": "svdquant_w4a4", "rank": rank, "act_unsigned": act_unsigned, "group_size": 64}
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
def _inputs(m, k, count, g, unsigned=False) -> list:
    xs = [_normal((m, k), 1.0, g) for _ in range(count)]
    return [F.gelu(x) for x in xs] if unsigned else xs  # an unsigned layer reads post-GELU activations


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


def project_kernel(lin, x):
    """Whether the default choice runs the project's kernel (not kitchen's) for ``lin(x)``."""
    with kernels.forced("auto"):
        fmt = formats.format_of(lin.weight).name
        mod = kernels.w4a4_kernel(x.device) if fmt == "svdquant_w4a4" else kernels.awq_kernel(x.device, x.shape[0])
        return mod is not None and mod.supports(x, lin.weight)


def linear_row(base, layers, xs, floats, iters, device) -> dict:
    """One table row: ``layer(x)`` under kitchen's kernels and under the default choice, next to ``floats``."""
    calls = [functools.partial(lin, x) for lin, x in zip(layers, xs)]
    with kernels.forced("kitchen"):
        kit, kit_method = time_us(calls, iters, device)
    project = project_kernel(layers[0], xs[0])
    with kernels.forced("auto"):  # where the default choice is kitchen's kernel, it is the same measurement
        int4, method = time_us(calls, iters, device) if project else (kit, kit_method)
    ratio = lambda t: None if t is None else t / int4  # noqa: E731
    return {**base, "int4_us": int4, "kitchen_us": kit, **floats, "int4_kernel": "project" if project else "kitchen",
            "methods": {"int4": method, "kitchen": kit_method, **floats["methods"]},
            "bf16/int4": ratio(floats["bf16_us"]), "fp8/int4": ratio(floats["fp8_us"]), "kitchen/int4": ratio(kit)}


def bench_awq(suite, device, iters, g) -> list:
    k, n = suite.awq
    layers = copied_layers(lambda: int4_linear(awq_tensors(n, k, g), n, k, g), 0, device)
    dense = layers[:copies(n * k, device)]  # as many as FP8 needs (bf16 needs fewer)
    ws, bs = [awq_dequantized(lin) for lin in dense], [lin.bias for lin in dense]
    rows = []
    for m in suite.awq_m:
        logger.info("awq_w4a16 M=%d %d->%d (%d copies)", m, k, n, len(layers))
        xs = _inputs(m, k, len(layers), g)
        base = {"section": "awq", "case": "awq_w4a16 g64", "M": m, "K": k, "N": n, "rank": None, "loras": 0}
        rows.append(linear_row(base, layers, xs, float_times(ws, bs, xs, iters, device), iters, device))
    return rows


def _append_lora(layers, n, k, rank, g):
    """One more rank-``rank`` LoRA on every layer, as the model patcher lands one (appended rank)."""
    delta = LowRankDelta(_normal((n, rank), 0.01, g, FP32), _normal((rank, k), 0.01, g, FP32))
    for lin in layers:
        formats.format_of(lin.weight).apply_deltas([(lin, [delta])])


def _w4a4_rows(case, k, n, unsigned, rank, suite, floats, iters, device, g) -> list:
    make = lambda: int4_linear(svdquant_tensors(n, k, rank, g, unsigned), n, k, g)  # noqa: E731
    layers, rows, applied = copied_layers(make, min(suite.w4a4_m) * k * 2, device), [], 0
    for loras in suite.loras:
        for _ in range(loras - applied):
            _append_lora(layers, n, k, suite.lora_rank, g)
        applied = loras
        for m in suite.w4a4_m:
            logger.info("%s M=%d %d->%d r%d + %d LoRA (%d copies)", case, m, k, n, rank, loras, len(layers))
            if (m, k, n) not in floats:  # bf16 / FP8 once per shape, reused across ranks and LoRAs
                ws = [_normal((n, k), k ** -0.5, g) for _ in range(copies((n + m) * k, device))]  # FP8's bytes
                floats[m, k, n] = float_times(ws, [_normal((n,), 0.1, g) for _ in ws], _inputs(m, k, len(ws), g),
                                              iters, device)
            xs = _inputs(m, k, len(layers), g, unsigned)
            base = {"section": "w4a4", "case": case, "M": m, "K": k, "N": n, "rank": rank, "loras": loras}
            rows.append(linear_row(base, layers, xs, floats[m, k, n], iters, device))
    return rows


def bench_w4a4(suite, device, iters, g) -> list:
    rows, floats = [], {}
    for case, k, n, unsigned in suite.w4a4:
        for rank in suite.ranks:
            rows += _w4a4_rows(case, k, n, unsigned, rank, suite, floats, iters, device, g)
            _free(device)
    order = {(k, n): i for i, (_, k, n, _) in enumerate(suite.w4a4)}
    return sorted(rows, key=lambda r: (order[r["K"], r["N"]], r["M"], r["rank"], r["loras"]))


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


def model_row(name, model, inputs, iters, device) -> dict:
    """Median forward ms (after 2 warm-ups), peak memory while running and weight memory of ``model``."""
    with torch.no_grad():
        for _ in range(2):
            model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        runs = [_forward_ms(model, inputs, device) for _ in range(iters)]
    return {"section": "model", "model": name, "forward_ms": statistics.median(r[0] for r in runs),
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
    base = model_row("int4", model, inputs, iters, device)
    lora = _apply_lora(patcher, lora_sd, 1.0, device)
    with_lora = model_row(f"int4 + LoRA r{suite.lora_rank} on {len(lora.patches)} layers", model, inputs, iters,
                          device)
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
            "awq_w4a16 modulation, the rest bf16")
    rows, lora = [], {}
    if "model" in sections:  # bf16 first, then freed: the two models need not fit at once
        logger.info("building the bf16 model")
        rows.append(model_row("bf16", bf16_model(suite, device, g), inputs, iters, device))
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
    """Every selected section, in this process → ``{"info", "rows", "lora", ...}`` (``format_report`` prints it)."""
    device = torch.device(device) if device else comfy.model_management.get_torch_device()
    suite = SMALL if small or device.type != "cuda" else FULL
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
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
    return {"info": run_info(device), "suite": "small" if suite is SMALL else "full", "rows": rows, "lora": lora,
            "model": desc, "model_iters": iters or suite.model_iters, "lora_rank": suite.lora_rank,
            "seconds": time.perf_counter() - t0}


def _num(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def _table(head, rows) -> list:
    return [f"| {' | '.join(head)} |", "|" + "---|" * len(head)] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def _linear_table(rows, mark_kitchen) -> list:
    def method(r):
        used = set(r["methods"].values()) - {"n/a"}
        text = used.pop() if len(used) == 1 else "/".join(r["methods"].values()) + " (int4/kitchen/bf16/fp8)"
        if r["note"]:
            text += f"; {r['note']}"
        if mark_kitchen and r["int4_kernel"] == "kitchen":
            text += "; int4 = kitchen's kernel"
        return text
    head = ("case", "M", "K→N", "rank", "LoRAs", "int4 µs", "kitchen µs", "bf16 µs", "fp8 µs", "bf16/int4",
            "fp8/int4", "kitchen/int4", "method")
    return _table(head, [(r["case"], r["M"], f"{r['K']}→{r['N']}", r["rank"] or "–", r["loras"],
                          *(_num(r[k]) for k in ("int4_us", "kitchen_us", "bf16_us", "fp8_us")),
                          *(_num(r[k], ".3f") for k in ("bf16/int4", "fp8/int4", "kitchen/int4")), method(r))
                         for r in rows])


def _model_table(rows) -> list:
    keys = ("forward_ms", "host_ms", "peak_gib", "weights_gib")
    cells = [(r["model"], *(_num(r[k], s) for k, s in zip(keys, (".1f", ".1f", ".3g", ".3g"))),
              _num(r.get("lora_overhead_pct"), "+.1f") + (" %" if "lora_overhead_pct" in r else "")) for r in rows]
    by = {r["model"]: r for r in rows}
    if "bf16" in by and "int4" in by:
        ratios = (None if by["int4"][k] is None else by["bf16"][k] / by["int4"][k] for k in keys)
        cells.append(("bf16/int4", *(_num(v, ".2f") for v in ratios), ""))
    return _table(("model", "forward ms", "host ms (call returned)", "peak GiB", "weights GiB", "LoRA overhead"),
                  cells)


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


def format_report(result, command="python -m comfy.quant bench") -> str:
    """The report as a markdown section: a header line, one table per section, a note on the method."""
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
    sections = {r["section"] for r in rows} | ({"lora"} if result["lora"] else set())
    note = [f"`{command}` ({result['suite']} suite, {result['seconds']:.0f} s)."]
    if sections & {"awq", "w4a4"}:
        note.append(f"Linears: median µs per call; on CUDA a CUDA graph of ≥{GRAPH_CALLS} calls replayed and timed "
                    f"with CUDA events (graph), else CUDA events around each of ≥{MIN_EVENTS} calls (events); on the "
                    "CPU time.perf_counter; the calls cycle through weight/input copies that together overflow twice "
                    "the L2 cache; bf16 and FP8 of a W4A4 shape are measured once for all its rows. Ratio > 1: int4 "
                    "faster." + (" FP8 is timed on CUDA only." if info["capability"] == "n/a" else ""))
    if "model" in sections:
        note.append(f"Model: median of {result['model_iters']} forwards after 2 warm-ups (perf_counter, "
                    "synchronized); peak = max_memory_allocated during them.")
    if "lora" in sections:
        note.append("LoRA steps: one run each (perf_counter, synchronized).")
    out += ["", " ".join(note)]
    return "\n".join(out) + "\n"

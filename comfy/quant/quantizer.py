"""Offline int4 quantizer: a float ComfyUI Qwen-Image state dict → a ComfyUI-native int4 checkpoint.

Same split as Nunchaku's Qwen-Image files: the block linears become SVDQuant W4A4, the modulation
linears (``img_mod.1``, ``txt_mod.1``) AWQ W4A16, everything else stays float.

SVDQuant, per layer (q/k/v jointly, so they share ``smooth_factor`` and ``proj_down``):
  smoothing  s_k = a_k^α / w_k^(1−α)  from calibration input absmax a and weight column absmax w
             (s = 1 without calibration);
  low rank   top-R SVD of W·diag(s): proj_up = U√Σ, proj_down = diag(1/s)·V√Σ, so the branch reads raw x;
  residual   (W − proj_up·proj_downᵀ)·diag(s), rounded per (row, 64-group) to signed int4 [−7, 7];
  unsigned   post-GELU layers store bias − 0.171875·rowsum(Q/s), Q the dequantized residual: the kernel's
             shifted main path adds exactly that back. (Nunchaku uses the unquantized residual W − L; the
             dequantized one also cancels the 0.171875·rowsum(rounding error) offset that leaves behind.)
AWQ: per (row, group) asymmetric round-to-nearest on [min, max], ``zeros = min + 8·scale``.
Scales and factors are rounded to the storage dtype *before* the codes are computed, so the stored
tensors are self-consistent.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import torch

from comfy.quant.formats import decode_config, encode_config, quantization_header
from comfy.quant.formats.svdquant_w4a4 import GROUP_SIZE, UNSIGNED_SHIFT
from comfy.quant.packing import pack_int4
from comfy.quant.safetensors_stream import entry_bound, check_output, streaming_file

logger = logging.getLogger(__name__)

BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.(.+)$")
JOINT = {"attn.to_q": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "attn.add_q_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
JOINT_MEMBERS = {m for group in JOINT.values() for m in group}
SVDQUANT_SINGLE = {"attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                   "txt_mlp.net.0.proj", "txt_mlp.net.2"}
UNSIGNED = {"img_mlp.net.2", "txt_mlp.net.2"}
AWQ = {"img_mod.1", "txt_mod.1"}


@dataclass(frozen=True)
class QuantizeOptions:
    rank: int = 32
    smooth_alpha: float = 0.5
    awq_group_size: int = 64
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0


@dataclass(frozen=True)
class Unit:
    """One quantization job: ``kind`` is "svdquant" or "awq"; ``paths`` the module paths quantized together."""

    kind: str
    paths: tuple[str, ...]

    @property
    def keys(self) -> list[str]:
        return [f"{p}.{s}" for p in self.paths for s in ("weight", "bias")]


def plan_units(keys) -> tuple[list[Unit], list[str]]:
    """Split checkpoint keys into quantization units and float keys passed through."""
    keys = list(keys)
    present = set(keys)
    units, claimed = [], set()
    for key in keys:
        if not key.endswith(".weight"):
            continue
        m = BLOCK.match(key[: -len(".weight")])
        if not m:
            continue
        block, local = m.groups()
        if local in JOINT:
            paths = tuple(f"{block}.{p}" for p in JOINT[local])
            missing = [p for p in paths if f"{p}.weight" not in present]
            if missing:
                raise ValueError(f"{block}: joint q/k/v quantization needs {missing} (not in the file)")
            units.append(Unit("svdquant", paths))
        elif local in SVDQUANT_SINGLE:
            units.append(Unit("svdquant", (f"{block}.{local}",)))
        elif local in AWQ:
            units.append(Unit("awq", (f"{block}.{local}",)))
        else:
            continue
    for u in units:
        claimed.update(k for k in u.keys if k in present)
    return units, [k for k in keys if k not in claimed]


def smoothing_factor(weight: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if act_absmax is None:
        return torch.ones(weight.shape[1])
    w = weight.abs().amax(0).clamp_min(1e-6)
    a = act_absmax.float().clamp_min(1e-6)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(1e-4, 1e4)


def _low_rank(w: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if min(w.shape) <= 1024:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].t()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=rank + 16, niter=4)
    return u[:, :rank], s[:rank], v[:, :rank]


def quantize_svdquant(weights, biases, act_absmax=None, *, act_unsigned=False, options=QuantizeOptions()):
    """Quantize linears that read the same input → one canonical tensor dict per linear."""
    dt = options.dtype
    w = torch.cat([x.float() for x in weights], 0)
    n_total, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"in_features {k} is not a multiple of {GROUP_SIZE}")
    rank = min(options.rank, n_total, k)
    if act_absmax is not None and act_unsigned:
        act_absmax = act_absmax.float() + UNSIGNED_SHIFT
    smooth = smoothing_factor(w, act_absmax, options.smooth_alpha).to(dt)
    s = smooth.float()
    u, sv, v = _low_rank(w * s, rank, options.seed)
    root = sv.sqrt()
    proj_up = (u * root).to(dt)
    proj_down = (v * root / s[:, None]).to(dt)
    residual = ((w - proj_up.float() @ proj_down.float().t()) * s).view(n_total, k // GROUP_SIZE, GROUP_SIZE)
    scale = (residual.abs().amax(-1) / 7).clamp_min(1e-8).to(dt)
    codes = (residual / scale.float().unsqueeze(-1)).round().clamp(-7, 7).view(n_total, k)

    out, start = [], 0
    for i, weight in enumerate(weights):
        rows = slice(start, start + weight.shape[0])
        start += weight.shape[0]
        t = {
            "weight": pack_int4(codes[rows]),
            "weight_scale": scale[rows].t().contiguous(),
            "weight_proj_down": proj_down,
            "weight_proj_up": proj_up[rows].contiguous(),
            "weight_smooth_factor": smooth,
        }
        bias = biases[i] if biases is not None else None
        if bias is not None:
            bias = bias.float()
            if act_unsigned:  # the kernel adds 0.171875·rowsum(Q/s) back through the shifted main path
                dequantized = codes[rows].view(-1, k // GROUP_SIZE, GROUP_SIZE) * scale[rows].float().unsqueeze(-1)
                bias = bias - UNSIGNED_SHIFT * (dequantized.view(-1, k) / s).sum(1)
            t["bias"] = bias.to(dt)
        t["comfy_quant"] = encode_config({"format": "svdquant_w4a4", "group_size": GROUP_SIZE, "rank": rank,
                                          "act_unsigned": act_unsigned})
        out.append(t)
    return out


def quantize_awq(weight, bias=None, *, options=QuantizeOptions()):
    dt, g = options.dtype, options.awq_group_size
    w = weight.float()
    n, k = w.shape
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of the AWQ group size {g}")
    groups = w.view(n, k // g, g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(dt)
    zeros = (lo + 8 * scale.float()).to(dt)
    codes = ((groups - zeros.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 8).round().clamp(0, 15)
    t = {
        "weight": pack_int4(codes.view(n, k)),
        "weight_scale": scale.t().contiguous(),
        "weight_zeros": zeros.t().contiguous(),
    }
    if bias is not None:
        t["bias"] = bias.to(dt)
    t["comfy_quant"] = encode_config({"format": "awq_w4a16", "group_size": g})
    return t


def quantize_unit(unit: Unit, get, calibration=None, options=QuantizeOptions()) -> dict[str, torch.Tensor]:
    """Quantized tensors (``<path>.<key>``) for one unit; ``get(key)`` returns a tensor or None."""
    weights = [get(f"{p}.weight") for p in unit.paths]
    biases = [get(f"{p}.bias") for p in unit.paths]
    if unit.kind == "awq":
        parts = [quantize_awq(weights[0], biases[0], options=options)]
    else:
        local = BLOCK.match(unit.paths[0]).group(2)
        act = (calibration or {}).get(unit.paths[0])
        parts = quantize_svdquant(weights, biases, act, act_unsigned=local in UNSIGNED, options=options)
    return {f"{p}.{k}": v for p, t in zip(unit.paths, parts) for k, v in t.items()}


def layer_configs(tensors: dict) -> dict[str, dict]:
    """``{layer: JSON}`` of the ``<layer>.comfy_quant`` entries among ``tensors``."""
    suffix = ".comfy_quant"
    return {k[: -len(suffix)]: decode_config(v, k[: -len(suffix)]) for k, v in tensors.items() if k.endswith(suffix)}


def quantize_state_dict(sd: dict, options=QuantizeOptions(), calibration=None, progress=True):
    """Quantize an in-memory state dict (consumed as it goes) → ``(int4 state dict, metadata)``."""
    from tqdm import tqdm

    units, passthrough = plan_units(list(sd))
    out = {}
    for unit in tqdm(units, desc="quantizing", unit="layer", disable=not progress):
        out.update(quantize_unit(unit, sd.get, calibration, options))
        for key in unit.keys:
            sd.pop(key, None)
    for key in passthrough:
        out[key] = sd.pop(key)
    return out, {"_quantization_metadata": quantization_header(layer_configs(out))}


def _header_bound(units, passthrough, get_shape, metadata) -> int:
    """Upper bound of the output header: ≤ 7 tensors per quantized linear (names ≤ 24 bytes longer),
    passthrough tensors as they are, the input metadata and one _quantization_metadata line per layer."""
    total = 4096 + sum(len(json.dumps(k)) + len(json.dumps(v)) for k, v in metadata.items())
    for unit in units:
        for path in unit.paths:
            total += 7 * entry_bound(path + ".weight_smooth_factor", 2) + 2 * (len(json.dumps(path)) + 120)
    return total + sum(entry_bound(k, len(get_shape(k))) for k in passthrough)


def quantize_file(in_path, out_path, options=QuantizeOptions(), calibration=None, progress=True):
    """Stream a safetensors file layer by layer into an int4 checkpoint; returns layer counts by format.

    Memory holds one layer (or one q/k/v group) at a time: inputs are read with ``safe_open`` and
    outputs written as they are made. Refuses (``ValueError``) an output that is the input file.
    """
    check_output(in_path, out_path, "quantize_file", overwrite=True)
    import safetensors
    from tqdm import tqdm

    with safetensors.safe_open(str(in_path), framework="pt") as f:
        keys = list(f.keys())
        units, passthrough = plan_units(keys)
        present = set(keys)
        metadata = dict(f.metadata() or {})

        def get(key):
            return f.get_tensor(key) if key in present else None

        def get_shape(key):
            return f.get_slice(key).get_shape()

        layers = {}
        reserve = _header_bound(units, passthrough, get_shape, metadata)
        with streaming_file(str(out_path), reserve) as writer:
            for unit in tqdm(units, desc="quantizing", unit="layer", disable=not progress):
                out = quantize_unit(unit, get, calibration, options)
                for name, tensor in out.items():
                    writer.add(name, tensor)
                layers.update(layer_configs(out))
            for key in passthrough:
                writer.add(key, f.get_tensor(key))
            metadata["_quantization_metadata"] = quantization_header(layers)
            writer.finish(metadata)
    counts = {"svdquant_w4a4": sum(len(u.paths) for u in units if u.kind == "svdquant"),
              "awq_w4a16": sum(1 for u in units if u.kind == "awq"), "float": len(passthrough)}
    logger.info("wrote %s: %s", out_path, counts)
    return counts


def record_activation_stats(diffusion_model: torch.nn.Module, run) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax of every quantizable linear's input while ``run()`` executes."""
    stats, handles = {}, []
    for path, module in diffusion_model.named_modules():
        m = BLOCK.match(path)
        if not m or m.group(2) not in (SVDQUANT_SINGLE | JOINT_MEMBERS):
            continue

        def hook(_mod, args, path=path):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            stats[path] = torch.maximum(stats[path], a) if path in stats else a

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats

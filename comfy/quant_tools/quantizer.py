"""Offline int4 quantizer: a float ComfyUI diffusion model state dict → a ComfyUI-native int4 checkpoint.

Architectures: Qwen-Image, Z-Image(-Turbo) and Flux.1, recognised from the file's key names
(``comfy.quant.architectures.from_comfy_keys``). Which linear becomes what comes from that module's
ComfyUI-side layer tables, the same split as Nunchaku's files (nunchaku-format.md §5):
  Qwen-Image  block linears SVDQuant W4A4 (q/k/v and add_q/k/v jointly), ``img_mod.1`` / ``txt_mod.1`` AWQ W4A16;
  Z-Image     ``layers.N``: ``attention.qkv``, ``attention.out``, ``feed_forward.w1`` + ``w3`` (jointly: one
              input), ``feed_forward.w2`` W4A4, all signed; ``adaLN_modulation.0`` and the refiners
              (``noise_refiner`` / ``context_refiner``, float in Nunchaku's releases) stay float;
  Flux.1      ``img_mod.lin`` / ``txt_mod.lin`` / ``modulation.lin`` AWQ (planar ComfyUI order); attention
              qkv / proj, ``mlp.0``, ``mlp.2`` (unsigned) and single ``linear1`` W4A4; single ``linear2`` one
              W4A4 layer split along K (``in_splits`` [dim, 4·dim], ``act_unsigned`` [false, true]: the
              attention half of its input is signed, the post-GELU MLP half unsigned).
Everything else stays float.

SVDQuant, per layer (a share group jointly, so its members share ``smooth_factor`` and ``proj_down``):
  smoothing  s_k = a_k^α / w_k^(1−α)  from calibration input absmax a (+0.171875 on unsigned columns) and
             weight column absmax w (s = 1 without calibration);
  low rank   top-R SVD of W·diag(s): proj_up = U√Σ, proj_down = diag(1/s)·V√Σ, so the branch reads raw x;
  residual   (W − proj_up·proj_downᵀ)·diag(s), rounded per (row, 64-group) to signed int4 [−7, 7];
  unsigned   layers store bias − 0.171875·Σ_k Q[n,k]/s_k over their unsigned columns k, Q the dequantized
             residual: the kernel's shifted main path adds exactly that back. (Nunchaku uses the unquantized
             residual W − L; the dequantized one also cancels the 0.171875·rowsum(rounding error) offset
             that leaves behind.) An input-split layer's segments share the one low-rank branch (rank R over
             the whole K) and smooth factor; only the activation grid differs per segment.
AWQ: per (row, group) asymmetric round-to-nearest on [min, max], ``zeros = min + 8·scale``.
Scales and factors are rounded to the storage dtype *before* the codes are computed, so the stored
tensors are self-consistent.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import torch

from comfy.quant import architectures as archs
from comfy.quant.errors import QuantFileError, QuantizeInputError
from comfy.quant.formats import decode_config, encode_config, quantization_header
from comfy.quant.formats.base import nonfinite_summary
from comfy.quant.formats.svdquant_w4a4 import GROUP_SIZE, UNSIGNED_SHIFT
from comfy.quant.packing import pack_int4
from comfy.quant_tools.safetensors_stream import check_output, entry_bound, streaming_file
from comfy.quant.files import open_checked

logger = logging.getLogger(__name__)

# Qwen-Image's table under its old names (bench.py and the Qwen-Image tests use them); the facts live in
# comfy.quant.architectures.
_QWEN_BLOCK = archs.QWEN_IMAGE.blocks[0]
BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.(.+)$")
JOINT = {group[0]: group for group in _QWEN_BLOCK.share}
JOINT_MEMBERS = {m for group in _QWEN_BLOCK.share for m in group}
SVDQUANT_SINGLE = {rel for rel, layer in _QWEN_BLOCK.layers.items()
                   if layer.kind == archs.SVDQUANT and rel not in JOINT_MEMBERS}
UNSIGNED = {rel for rel, layer in _QWEN_BLOCK.layers.items() if layer.act_unsigned is True}
AWQ = {rel for rel, layer in _QWEN_BLOCK.layers.items() if layer.kind == archs.AWQ}
FLOAT_DTYPES = ("F16", "BF16", "F32")  # safetensors header dtypes of the weights quantize reads
SUPPORTED = ", ".join(a.title for a in archs.ARCHITECTURES)


@dataclass(frozen=True)
class QuantizeOptions:
    rank: int = 32
    smooth_alpha: float = 0.5
    awq_group_size: int = 64
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0

    def __post_init__(self):
        if not _is_int(self.rank) or self.rank < 0:
            raise ValueError(f"QuantizeOptions.rank: expected an integer >= 0, got {self.rank!r}")
        if not 0 <= self.smooth_alpha <= 1:  # also refuses nan
            raise ValueError(f"QuantizeOptions.smooth_alpha: expected a number in [0, 1], got {self.smooth_alpha!r}")
        if not _is_int(self.awq_group_size) or self.awq_group_size < 1:
            raise ValueError(f"QuantizeOptions.awq_group_size: expected an integer >= 1, got {self.awq_group_size!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Unit:
    """One quantization job: ``kind`` is "svdquant" or "awq"; ``paths`` the module paths quantized together;
    ``layer`` their row of the architecture's layer table (signedness, input splits)."""

    kind: str
    paths: tuple[str, ...]
    layer: archs.Layer | None = None

    @property
    def keys(self) -> list[str]:
        return [f"{p}.{s}" for p in self.paths for s in ("weight", "bias")]


def detect_architecture(keys) -> archs.Architecture | None:
    """The architecture of a float ComfyUI-layout file from its key names (``architectures.from_comfy_keys``)."""
    return archs.from_comfy_keys(keys)


def _claiming_architecture(keys: list) -> archs.Architecture | None:
    """For a partial state dict no architecture recognises: the one whose layer tables name most of its weights."""
    best, most = None, 0
    for arch in archs.ARCHITECTURES:
        n = sum(1 for k in keys if k.endswith(".weight") and arch.comfy_layer(k[: -len(".weight")]))
        if n > most:
            best, most = arch, n
    return best


def _group_label(group: tuple[str, ...]) -> str:
    """``q/k/v`` for (attn.to_q, attn.to_k, attn.to_v), ``w3/w1`` for (feed_forward.w3, feed_forward.w1)."""
    names = [m.rsplit(".", 1)[-1] for m in group]
    head = os.path.commonprefix(names)
    head = head[: head.rfind("_") + 1]
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    tail = tail[tail.find("_"):] if "_" in tail else ""
    return "/".join(n[len(head): len(n) - len(tail)] for n in names)


def plan_units(keys, arch: archs.Architecture | None = None) -> tuple[list[Unit], list[str]]:
    """Split checkpoint keys into quantization units and float keys passed through.

    ``arch`` defaults to the one the keys show (or, for a partial state dict, the one whose tables name
    most of its weights). Blocks Nunchaku's releases keep float (``BlockKind.released_float``) stay float.
    A share group becomes one unit at its first member's key (or the first present member's, when that one
    is missing); a member missing from the keys is a ``QuantizeInputError`` naming it."""
    keys = list(keys)
    present = set(keys)
    if arch is None:
        arch = detect_architecture(keys) or _claiming_architecture(keys)
    units, claimed, grouped = [], set(), set()
    for key in keys if arch is not None else ():
        if not key.endswith(".weight"):
            continue
        found = arch.comfy_layer(key[: -len(".weight")])
        if found is None:
            continue
        kind, block, rel, layer = found
        if kind.released_float or layer.kind == archs.FLOAT:
            continue
        group = kind.share_group(rel)
        if group is None:
            units.append(Unit(layer.kind, (f"{block}.{rel}",), layer))
            continue
        if (block, group) in grouped or (rel != group[0] and f"{block}.{group[0]}.weight" in present):
            continue   # made where its first member is (the file's order, as before), or made already
        grouped.add((block, group))
        paths = tuple(f"{block}.{p}" for p in group)
        missing = [p for p in paths if f"{p}.weight" not in present]
        if missing:
            raise QuantizeInputError(f"{block}: joint {_group_label(group)} quantization needs {missing} "
                                     f"(no tensor '{missing[0]}.weight' in the file)", tensor=f"{missing[0]}.weight")
        units.append(Unit(layer.kind, paths, layer))
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
    if rank == 0:  # no low-rank branch: the residual is the whole weight
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0), w.new_zeros(w.shape[1], 0)
    if min(w.shape) <= 1024:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].t()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 16, min(w.shape)), niter=4)
    return u[:, :rank], s[:rank], v[:, :rank]


def _unsigned_columns(k: int, act_unsigned, in_splits) -> tuple[torch.Tensor, bool | list]:
    """(bool mask (K,) of the input columns read unsigned (after a GELU), act_unsigned as the layer JSON
    stores it); with ``in_splits`` each segment has its own flag."""
    if in_splits is None:
        if not isinstance(act_unsigned, bool):
            raise ValueError(f"act_unsigned: expected a bool without in_splits, got {act_unsigned!r}")
        return torch.full((k,), act_unsigned), act_unsigned
    splits, flags = [int(w) for w in in_splits], [bool(u) for u in act_unsigned]
    if len(flags) != len(splits) or sum(splits) != k or any(w <= 0 or w % GROUP_SIZE for w in splits):
        raise ValueError(f"in_splits {splits} / act_unsigned {flags}: expected one flag per segment and segments "
                         f"that are positive multiples of {GROUP_SIZE} summing to in_features {k}")
    return torch.cat([torch.full((w,), u) for w, u in zip(splits, flags)]), flags


def quantize_svdquant(weights, biases, act_absmax=None, *, act_unsigned=False, in_splits=None,
                      options=QuantizeOptions()):
    """Quantize linears that read the same input → one canonical tensor dict per linear.

    ``in_splits`` (segment widths along K, with ``act_unsigned`` a list of one flag per segment) makes an
    input-split layer (Flux ``linear2``): one smooth factor, low-rank branch and residual over the whole
    K, each segment's activations quantized with its own signedness at run time, so the calibration shift
    and the bias compensation apply to the unsigned segments' columns only."""
    dt = options.dtype
    w = torch.cat([x.float() for x in weights], 0)
    n_total, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"in_features {k} is not a multiple of {GROUP_SIZE}")
    columns, stored_unsigned = _unsigned_columns(k, act_unsigned, in_splits)
    unsigned, split = bool(columns.any()), not bool(columns.all())
    if unsigned and (biases is None or any(b is None for b in biases)):
        raise ValueError("a layer with unsigned activations needs a bias: it carries the shift compensation")
    rank = min(options.rank, n_total, k)
    if act_absmax is not None and unsigned:  # the kernel quantizes x + 0.171875 on those columns
        act_absmax = act_absmax.float() + UNSIGNED_SHIFT * columns if split else act_absmax.float() + UNSIGNED_SHIFT
    smooth = smoothing_factor(w, act_absmax, options.smooth_alpha).to(dt)
    s = smooth.float()
    u, sv, v = _low_rank(w * s, rank, options.seed)
    root = sv.sqrt()
    proj_up = (u * root).to(dt)
    proj_down = (v * root / s[:, None]).to(dt)
    residual = ((w - proj_up.float() @ proj_down.float().t()) * s).view(n_total, k // GROUP_SIZE, GROUP_SIZE)
    scale = (residual.abs().amax(-1) / 7).clamp_min(1e-8).to(dt)
    codes = (residual / scale.float().unsqueeze(-1)).round().clamp(-7, 7).view(n_total, k)

    config = {"format": "svdquant_w4a4", "group_size": GROUP_SIZE, "rank": rank, "act_unsigned": stored_unsigned}
    if in_splits is not None:
        config["in_splits"] = [int(x) for x in in_splits]
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
            if unsigned:  # the kernel adds 0.171875·Σ_k Q[n,k]/s_k (k: unsigned columns) back via the shifted path
                dequantized = codes[rows].view(-1, k // GROUP_SIZE, GROUP_SIZE) * scale[rows].float().unsqueeze(-1)
                per_column = dequantized.view(-1, k) / s
                bias = bias - UNSIGNED_SHIFT * (per_column[:, columns] if split else per_column).sum(1)
            t["bias"] = bias.to(dt)
        t["comfy_quant"] = encode_config(config)
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


def _unit_layer(unit: Unit) -> archs.Layer:
    if unit.layer is not None:
        return unit.layer
    found = next((a.comfy_layer(unit.paths[0]) for a in archs.ARCHITECTURES if a.comfy_layer(unit.paths[0])), None)
    return found[3] if found else archs.Layer(unit.kind)


def quantize_unit(unit: Unit, get, calibration=None, options=QuantizeOptions()) -> dict[str, torch.Tensor]:
    """Quantized tensors (``<path>.<key>``) for one unit; ``get(key)`` returns a tensor or None."""
    weights = [get(f"{p}.weight") for p in unit.paths]
    biases = [get(f"{p}.bias") for p in unit.paths]
    if unit.kind == "awq":
        parts = [quantize_awq(weights[0], biases[0], options=options)]
    else:
        layer = _unit_layer(unit)
        act = next((calibration[p] for p in unit.paths if p in (calibration or {})), None)
        splits = layer.input_splits(*weights[0].shape)
        unsigned = list(layer.act_unsigned) if splits is not None else bool(layer.act_unsigned)
        parts = quantize_svdquant(weights, biases, act, act_unsigned=unsigned, in_splits=splits, options=options)
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
        split = unit.layer is not None and unit.layer.in_splits is not None  # its JSON lists splits and flags
        for path in unit.paths:
            total += 7 * entry_bound(path + ".weight_smooth_factor", 2) + 2 * (len(json.dumps(path)) + 120)
            total += 2 * 120 if split else 0
    return total + sum(entry_bound(k, len(get_shape(k))) for k in passthrough)


def w4a4_bytes(n: int, k: int, rank: int) -> int:
    """Bytes of one (n, k) W4A4 layer's tensors with bf16 side tensors, bias left out: packed codes, one
    scale per (row, 64-group), proj_up (n, rank), proj_down (k, rank) and smooth_factor (k)."""
    return n * k // 2 + 2 * (n * (k // GROUP_SIZE) + rank * (n + k) + k)


def max_useful_rank(n: int, k: int) -> int:
    """The largest rank at which an (n, k) W4A4 layer is no larger than its bf16 weight (2·n·k bytes); a
    higher rank makes the int4 layer bigger than what it replaces (and rank > min(n, k) adds nothing)."""
    return max(0, min(n, k, (2 * n * k - w4a4_bytes(n, k, 0)) // (2 * (n + k))))


def check_rank(units, shape_of, rank: int) -> None:
    """``QuantizeInputError`` when ``rank`` exceeds ``max_useful_rank`` of a W4A4 layer, naming the
    layer with the lowest limit."""
    limits = [(max_useful_rank(*shape_of(f"{p}.weight")), p) for u in units if u.kind == "svdquant" for p in u.paths]
    if not limits or rank <= min(limits)[0]:
        return
    limit, path = min(limits)
    n, k = shape_of(f"{path}.weight")
    raise QuantizeInputError(f"rank {rank} is more than layer '{path}' ({n}x{k}) can use: at most rank {limit} "
                             f"for this model (a higher rank makes the int4 layer larger than its bf16 weight)",
                             layer=path, expected=f"rank <= {limit}", got=rank)


def check_quantizable(keys, metadata, dtype_of, shape_of, options=QuantizeOptions()):
    """``plan_units(keys)`` of a file's header, or ``QuantizeInputError`` when quantize cannot use the file:
    a Nunchaku or already-quantized checkpoint, not a supported architecture (Qwen-Image, Z-Image, Flux),
    linears that are not float or not shaped for int4, or a rank a layer cannot use (``check_rank``).
    ``dtype_of`` / ``shape_of`` read one tensor's header entry."""
    keys = list(keys)
    _check_not_quantized(keys, metadata or {})
    arch = _check_architecture(keys)
    units, passthrough = plan_units(keys, arch)
    present = set(keys)
    for unit in units:
        _check_unit(unit, present, dtype_of, shape_of, options)
    check_rank(units, lambda k: tuple(shape_of(k)), options.rank)
    return units, passthrough


def _check_not_quantized(keys: list, metadata: dict) -> None:
    from comfy.quant.nunchaku import is_nunchaku_checkpoint

    if is_nunchaku_checkpoint(keys, metadata):
        raise QuantizeInputError("a Nunchaku int4 checkpoint, already quantized: convert it with "
                                 "`python -m comfy.quant convert-nunchaku IN OUT` (or load it directly)")
    layers = [k for k in keys if k.endswith(".comfy_quant")]
    if layers or "_quantization_metadata" in metadata:
        why = f"'{layers[0]}'" if layers else "metadata '_quantization_metadata'"
        raise QuantizeInputError(f"already a quantized checkpoint ({why}); quantize takes a float {_titles('or')} "
                                 "file", tensor=layers[0] if layers else "_quantization_metadata")


def _titles(word: str) -> str:
    titles = [a.title for a in archs.ARCHITECTURES]
    return ", ".join(titles[:-1]) + f" {word} " + titles[-1]


def _readable(pattern: str) -> str:
    """``^layers\\.\\d+\\.attention\\.qkv\\.weight$`` → ``layers.N.attention.qkv.weight``."""
    return pattern.strip("^$").replace(r"\d+", "N").replace("\\", "")


def _block_key(arch: archs.Architecture) -> str:
    """The key pattern that best shows ``arch``: its first one inside a block."""
    return next((p for p in arch.comfy_keys if r"\d+" in p), arch.comfy_keys[0])


def _check_architecture(keys: list) -> archs.Architecture:
    """The supported architecture of a float file's keys, or ``QuantizeInputError`` saying what is off: keys
    under a prefix, one architecture's keys with some missing (or another family's), or none at all."""
    arch = detect_architecture(keys)
    if arch is not None:
        return arch
    shown = (", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")) if keys else "none"
    for arch in archs.ARCHITECTURES:
        pattern = re.compile(r"^(.+?\.)" + _block_key(arch).lstrip("^"))
        prefixes = [m.group(1) for k in keys if (m := pattern.match(k))]
        if prefixes:
            starts = _readable(arch.blocks[0].comfy_prefix.split("{}")[0])
            raise QuantizeInputError(f"not a {arch.title} diffusion model file: its keys carry the prefix "
                                     f"'{prefixes[0]}' (quantize takes a diffusion_models file, keys starting "
                                     f"{starts})")
    partial = []
    for arch in archs.ARCHITECTURES:
        found = [p for p in arch.comfy_keys if any(re.match(p, k) for k in keys)]
        if found:
            partial.append((len(found), -archs.ARCHITECTURES.index(arch), arch))
    if partial:
        arch = max(partial, key=lambda t: t[:2])[2]
        other = next((k for p in arch.comfy_exclude for k in keys if re.match(p, k)), None)
        if other is not None:
            raise QuantizeInputError(f"not a {arch.title} model quantize supports: '{other}' belongs to another "
                                     f"model family (supported: {SUPPORTED})", tensor=other)
        missing = next(_readable(p) for p in arch.comfy_keys if not any(re.match(p, k) for k in keys))
        raise QuantizeInputError(f"not a {arch.title} model: no {missing} (first keys: {shown})", tensor=missing)
    wanted = ", ".join(f"{_readable(_block_key(a))} ({a.title})" for a in archs.ARCHITECTURES)
    raise QuantizeInputError(f"not a supported architecture ({SUPPORTED}): none of {wanted} (first keys: {shown})")


def _check_unit(unit: Unit, present: set, dtype_of, shape_of, options: QuantizeOptions) -> None:
    group = GROUP_SIZE if unit.kind == "svdquant" else options.awq_group_size
    widths = {}
    for key in (k for k in unit.keys if k in present):
        dtype, shape = dtype_of(key), list(shape_of(key))
        if dtype not in FLOAT_DTYPES:
            raise QuantizeInputError(f"tensor '{key}' is {dtype}; quantize needs float linear weights "
                                     f"({', '.join(FLOAT_DTYPES)})", tensor=key, expected=FLOAT_DTYPES, got=dtype)
        if key.endswith(".weight"):
            if len(shape) != 2 or shape[1] % group:
                raise QuantizeInputError(f"tensor '{key}': expected a 2-D linear weight whose in_features is a "
                                         f"multiple of {group}, got shape {shape}", tensor=key, got=shape)
            widths[key] = shape[1]
    if len(set(widths.values())) > 1:
        first, width = next(iter(widths.items()))
        odd = next(k for k, w in widths.items() if w != width)
        raise QuantizeInputError(f"tensor '{odd}': in_features {widths[odd]}, but '{first}' has {width}; "
                                 f"{', '.join(unit.paths)} are quantized together (they read one input)",
                                 tensor=odd, expected=width, got=widths[odd])
    if unit.kind != "svdquant":
        return
    layer = _unit_layer(unit)
    weight = f"{unit.paths[0]}.weight"
    splits = layer.input_splits(*shape_of(weight))
    if splits is not None and any(w <= 0 or w % GROUP_SIZE for w in splits):
        shape = list(shape_of(weight))
        raise QuantizeInputError(f"tensor '{weight}': its input splits into {list(splits)} ({layer.in_splits}), "
                                 f"each must be a positive multiple of {GROUP_SIZE}, got shape {shape}",
                                 tensor=weight, got=shape)
    if any(layer.act_unsigned if isinstance(layer.act_unsigned, tuple) else [layer.act_unsigned]):
        absent = next((f"{p}.bias" for p in unit.paths if f"{p}.bias" not in present), None)
        if absent is not None:
            raise QuantizeInputError(f"no tensor '{absent}': {unit.paths[0]} reads unsigned (post-GELU) "
                                     "activations, and its bias carries the shift compensation", tensor=absent)


def read_calibration(calibration):
    """``(calibration dict, its file or None)``: a path is read whole (``UnreadableFileError`` naming it)."""
    if calibration is None or isinstance(calibration, dict):
        return calibration, None
    path = os.fspath(calibration)
    with open_checked(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, path


def check_calibration(calibration, units, shape_of) -> None:
    """``QuantizeInputError`` unless every calibration entry for a W4A4 layer is a finite float (K,) absmax
    and at least one entry names a layer of this model."""
    if not calibration:
        return
    widths = {p: shape_of(f"{p}.weight")[1] for u in units if u.kind == "svdquant" for p in u.paths}
    used = [k for k in calibration if k in widths]
    if not used:
        shown = ", ".join(list(calibration)[:3])
        raise QuantizeInputError(f"calibration names none of the model's {len(widths)} W4A4 layers "
                                 f"(first entries: {shown}); expected keys like {next(iter(widths), '?')}")
    for key in used:
        t = calibration[key]
        ok = (isinstance(t, torch.Tensor) and t.is_floating_point() and list(t.shape) == [widths[key]]
              and bool(torch.isfinite(t).all()))
        if not ok:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise QuantizeInputError(f"calibration entry '{key}': expected finite float input absmax of shape "
                                     f"[{widths[key]}], got {got}", tensor=key, expected=[widths[key]], got=got)


def check_finite_inputs(f, keys) -> None:
    """``QuantizeInputError`` naming the first float tensor among ``keys`` (read one at a time from the
    open file ``f``) that holds NaN or Inf: the SVD would fail on it (or the int4 file would carry it)."""
    for key in keys:
        if f.get_slice(key).get_dtype() not in FLOAT_DTYPES:
            continue
        got = nonfinite_summary(f.get_tensor(key))
        if got:
            raise QuantizeInputError(f"tensor '{key}': expected finite values, got {got}; nothing was written",
                                     tensor=key, expected="finite values", got=got)


def quantize_file(in_path, out_path, options=QuantizeOptions(), calibration=None, progress=True,
                  overwrite: bool = False):
    """Stream a safetensors file layer by layer into an int4 checkpoint; returns layer counts by format.

    Memory holds one layer (or one q/k/v group) at a time: inputs are read with ``safe_open`` and
    outputs written as they are made. Before any work it refuses (``QuantFileError``) an output it must
    not write (the input, a directory, a missing folder, an existing file unless ``overwrite``), an
    unreadable input, an input quantize cannot use (``check_quantizable``), a calibration (a dict,
    or a safetensors path) that does not fit it, and a float tensor holding NaN / Inf (``check_finite_inputs``:
    a pass over the float tensors before the first layer is quantized, one tensor in memory at a time). On
    any failure no output (and no temporary file) is left.
    """
    check_output(in_path, out_path, "quantize", overwrite=overwrite)
    calibration, calibration_file = read_calibration(calibration)
    with open_checked(in_path) as f:
        keys, metadata = list(f.keys()), dict(f.metadata() or {})

        def shape_of(key):
            return f.get_slice(key).get_shape()

        try:
            units, passthrough = check_quantizable(keys, metadata, lambda k: f.get_slice(k).get_dtype(), shape_of,
                                                   options)
            check_finite_inputs(f, keys)
        except QuantFileError as e:
            e.with_file(in_path)
            raise
        try:
            check_calibration(calibration, units, shape_of)
        except QuantFileError as e:
            if calibration_file:
                e.with_file(calibration_file)
            raise
        _write(f, str(out_path), units, passthrough, metadata, calibration, options, progress)
    counts = {"svdquant_w4a4": sum(len(u.paths) for u in units if u.kind == "svdquant"),
              "awq_w4a16": sum(1 for u in units if u.kind == "awq"), "float": len(passthrough)}
    logger.info("wrote %s: %s", out_path, counts)
    return counts


def _write(f, out_path: str, units, passthrough, metadata: dict, calibration, options, progress) -> None:
    """Quantize the units read from the open file ``f`` and copy the passthrough keys into ``out_path``."""
    from tqdm import tqdm

    present = set(f.keys())

    def get(key):
        return f.get_tensor(key) if key in present else None

    layers = {}
    reserve = _header_bound(units, passthrough, lambda k: f.get_slice(k).get_shape(), metadata)
    with streaming_file(out_path, reserve) as writer:
        for unit in tqdm(units, desc="quantizing", unit="layer", disable=not progress):
            out = quantize_unit(unit, get, calibration, options)
            for name, tensor in out.items():
                writer.add(name, tensor)
            layers.update(layer_configs(out))
        for key in passthrough:
            writer.add(key, f.get_tensor(key))
        writer.finish(dict(metadata, _quantization_metadata=quantization_header(layers)))


def _w4a4_module(path: str) -> bool:
    """Whether ``path`` is a W4A4 linear of a supported architecture's tables (not in a block kept float)."""
    for arch in archs.ARCHITECTURES:
        found = arch.comfy_layer(path)
        if found and found[3].kind == archs.SVDQUANT and not found[0].released_float:
            return True
    return False


def record_activation_stats(diffusion_model: torch.nn.Module, run) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax of every W4A4 linear's input while ``run()`` executes (any supported
    architecture: the module paths of the tables; an input-split layer's whole input, split at quantization)."""
    stats, handles = {}, []
    for path, module in diffusion_model.named_modules():
        if not _w4a4_module(path):
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

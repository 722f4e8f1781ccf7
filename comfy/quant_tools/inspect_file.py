"""Read an int4 checkpoint without building a model and report.

For each quantized layer: format, logical shape, rank, act_unsigned, bytes; totals; and every
validation problem the loader would raise, collected instead of raised (one per layer, the first).
Read from the file: the header, the small JSON entries, and each quantized layer's float side tensors
and bias (their values go through the format's own ``check_values`` / ``check_finite``); never the
packed int4 weights. A Nunchaku file gets the converter's checks, values included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from comfy.quant import formats, metadata as meta_json, nunchaku
from comfy.quant.errors import MetadataError, QuantizedLayerError
from comfy.quant.formats.base import SPELLING_WRITERS, check_finite
from comfy.quant.loading import header_prefix, quantization_layers
from comfy.quant.files import open_checked

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class LayerInfo:
    name: str
    format: str
    out_features: int | None = None
    in_features: int | None = None
    rank: int | None = None
    act_unsigned: bool | None = None
    nbytes: int = 0
    spelled: list[str] = field(default_factory=list)  # its tensor names that are not the canonical spelling


@dataclass
class Report:
    path: str
    kind: str = "comfyui"                      # "comfyui" or "nunchaku"
    layers: list[LayerInfo] = field(default_factory=list)
    float_bytes: int = 0
    float_tensors: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def bf16_equivalent_bytes(self) -> int:
        return self.float_bytes + sum(2 * (layer.out_features or 0) * (layer.in_features or 0) for layer in self.layers)


def _meta_tensor(f, key):
    sl = f.get_slice(key)
    return torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.uint8), device="meta")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def inspect_checkpoint(path) -> Report:
    """The report of the safetensors file ``path``; ``UnreadableFileError`` when it cannot be read."""
    report = Report(str(path))
    with open_checked(path) as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
        if nunchaku.is_nunchaku_checkpoint(keys, metadata):
            return _inspect_nunchaku(report, keys, metadata, lambda k: tuple(f.get_slice(k).get_shape()),
                                     f.get_tensor)
        metas = {k: _meta_tensor(f, k) for k in keys}
        confs = {k[: -len(".comfy_quant")]: _small_tensor(f, k, metas[k]) for k in keys if k.endswith(".comfy_quant")}
        header = _header_layers(report, metadata)
        prefix = header_prefix(keys, header)
        if prefix:
            report.notes.append(f"tensors carry the prefix '{prefix}', which the layer names of "
                                "_quantization_metadata lack (the loader strips it)")
        for layer, conf in header.items():
            confs.setdefault(prefix + layer, conf)
        metas = {k: t for k, t in metas.items() if not k.endswith(".comfy_quant")}
        claimed = set()
        for layer, raw in sorted(confs.items()):
            claimed.update(_inspect_layer(report, layer, raw, metas, f.get_tensor))
        _note_spellings(report)
    for key, t in metas.items():
        if key not in claimed:
            report.float_tensors += 1
            report.float_bytes += _nbytes(t)
    return report


def _small_tensor(f, key, meta: torch.Tensor) -> torch.Tensor:
    """The tensor ``key`` when it could be a layer's JSON; else its meta stand-in (the size is refused)."""
    return f.get_tensor(key) if meta.numel() <= meta_json.LAYER_JSON_BYTES else meta


def _header_layers(report: Report, metadata: dict) -> dict:
    """``{layer: JSON}`` of the ``_quantization_metadata`` header (the loader's own checks); a problem
    goes to the report instead of being raised."""
    try:
        return quantization_layers(metadata)
    except MetadataError as e:
        report.problems.append(str(e))
        return {}


def _inspect_layer(report: Report, layer: str, raw, metas, read) -> set[str]:
    """One layer's row and its first problem; ``read(key)`` reads a tensor (only side tensors and bias)."""
    prefix = layer + "."
    own = {k for k in metas if k.startswith(prefix) and "." not in k[len(prefix):]}
    info = LayerInfo(layer, "?", nbytes=sum(_nbytes(metas[k]) for k in own))
    report.layers.append(info)
    try:
        fmt, conf = formats.resolve(raw, layer)
        info.format = fmt.name
        tensors, keys = fmt.find_tensors(metas, prefix, layer)
        n, k_half = tensors["weight"].shape if tensors["weight"].dim() == 2 else (None, None)
        if n is None:
            raise QuantizedLayerError(layer, "weight", "a 2-D packed tensor", tuple(tensors["weight"].shape))
        info.out_features, info.in_features = n, 2 * k_half
        info.act_unsigned = conf.get("act_unsigned")
        if "weight_proj_down" in tensors:
            info.rank = tensors["weight_proj_down"].shape[-1]
        fmt.validate(layer, tensors, n, 2 * k_half, conf)  # shapes and dtypes, on meta tensors
        _check_rank(layer, info)
        info.spelled = sorted({key[len(prefix):] for key in keys} - {slot.key for slot in fmt.slots})
        side = {slot.key: read(key) for slot, key in zip(fmt.slots, keys) if not slot.packed}
        report.notes.extend(f"quantized layer '{layer}': {w}" for w in fmt.check_values(layer, side))
        bias = metas.get(prefix + "bias")
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise QuantizedLayerError(layer, "bias", f"shape {(n,)}", tuple(bias.shape))
            check_finite(layer, "bias", read(prefix + "bias"))
    except ValueError as e:
        report.problems.append(str(e))
    return own


def _check_rank(layer: str, info: LayerInfo) -> None:
    """A problem when the layer's rank makes it larger than its bf16 weight (the rule ``quantize`` refuses by)."""
    from comfy.quant_tools.quantizer import max_useful_rank, w4a4_bytes

    n, k = info.out_features, info.in_features
    if info.rank is None or info.rank <= max_useful_rank(n, k):
        return
    raise QuantizedLayerError(layer, "weight_proj_down", f"rank <= {max_useful_rank(n, k)} (a higher rank makes "
                              f"the layer larger than its bf16 weight: {w4a4_bytes(n, k, info.rank):,} > "
                              f"{2 * n * k:,} bytes)", f"rank {info.rank}")


def _note_spellings(report: Report) -> None:
    """One note for the layers stored in another writer's key spellings (they load as the canonical ones)."""
    spelled = [li for li in report.layers if li.spelled]
    if spelled:
        names = sorted({name for li in spelled for name in li.spelled})
        report.notes.append(f"{len(spelled)} of {len(report.layers)} quantized layers use the key spellings of "
                            f"{SPELLING_WRITERS[1]} ({', '.join(names)}); they load as the canonical ones")


def _inspect_nunchaku(report: Report, keys, metadata, shape_of, read) -> Report:
    report.kind = "nunchaku"
    report.notes.append(f"Nunchaku checkpoint ({metadata.get('model_class', 'model class not given')}); "
                        "load_diffusion_model converts it while loading, or run convert-nunchaku")
    if metadata.get("quantization_config"):
        report.notes.append(f"quantization_config: {metadata['quantization_config']}")
    try:
        counts = nunchaku.check_convertible(keys, metadata, shape_of)
        report.notes.append(f"modules: {counts.get('w4a4', 0)} W4A4, {counts.get('awq', 0)} AWQ, "
                            f"{counts.get('float', 0)} float tensors")
        problems, warnings = nunchaku.value_problems(keys, metadata, shape_of, read)
        report.problems.extend(problems)
        report.notes.extend(warnings)
    except ValueError as e:
        report.problems.append(str(e))
    return report


def _yes_no(act_unsigned) -> str:
    """``yes`` / ``no``, per input segment for a K-split layer (``no/yes``); empty when not known."""
    if act_unsigned is None:
        return ""
    if isinstance(act_unsigned, list):
        return "/".join("yes" if a else "no" for a in act_unsigned)
    return "yes" if act_unsigned else "no"


def format_report(report: Report) -> str:
    lines = [f"{report.path}  [{report.kind}]"]
    lines += [f"  note: {n}" for n in report.notes]
    if report.layers:
        lines.append(f"  {'layer':58} {'format':14} {'out x in':>13} {'rank':>5} {'unsigned':>8} {'bytes':>10}")
        for li in report.layers:
            shape = f"{li.out_features}x{li.in_features}" if li.out_features else "?"
            unsigned = _yes_no(li.act_unsigned)
            lines.append(f"  {li.name:58} {li.format:14} {shape:>13} {li.rank if li.rank is not None else '':>5} "
                         f"{unsigned:>8} {li.nbytes:>10}")
    counts = {}
    for li in report.layers:
        counts[li.format] = counts.get(li.format, 0) + 1
    if report.kind == "comfyui":
        lines.append(f"  totals: {counts or 'no quantized layers'}, {report.float_tensors} float tensors")
        lines.append(f"  bytes: quantized layers {report.quantized_bytes:,}, float {report.float_bytes:,}, "
                     f"total {report.quantized_bytes + report.float_bytes:,} "
                     f"(bf16 equivalent {report.bf16_equivalent_bytes:,})")
    lines.append(f"  problems: {len(report.problems)}")
    lines += [f"    - {p}" for p in report.problems]
    return "\n".join(lines)

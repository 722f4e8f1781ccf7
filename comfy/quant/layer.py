"""Runtime of a linear whose weight may be int4: load, save, forward, grouped forward, moves, output terms.

These functions take a host's linear module (upstream's ``MixedPrecisionOps.Linear`` or this
repository's) and touch only what both have: ``weight``, ``bias``, ``in_features``,
``out_features`` and ``factory_kwargs`` (``{"device", "dtype"}``, dtype = the compute dtype).

The weight is a kitchen ``QuantizedTensor`` wrapped in a ``Parameter``. Everything a LoRA adds lives
on that Parameter object: SVDQuant appends ranks to the tensor's own low-rank branch, other
formats attach additive output terms as the Parameter's ``int4_output_terms`` attribute. So a
patched weight is a new Parameter, the original is never written to, and putting the original
object back (what a model patcher's backup does) removes the LoRA exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref

import torch

from comfy.quant import formats, kitchen, loading
from comfy.quant.deltas import as_parameter, output_terms
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats.base import FLOAT_DTYPES, check_finite

logger = logging.getLogger(__name__)

def is_int4(weight) -> bool:
    """Whether ``weight`` holds one of this package's int4 formats."""
    return formats.format_of(weight) is not None


# ---- loading ----
def _has_int4_tensors(state_dict, prefix) -> bool:
    return any(prefix + name in state_dict for name in loading.int4_only_suffixes())


def int4_entry(state_dict, prefix):
    """The decoded ``comfy_quant`` JSON of ``prefix`` when it names an int4 format of this package, else None.

    A layer is int4 when its JSON names an int4 format or it holds a tensor only int4 formats write; only
    then is the JSON parsed strictly (bounded, errors naming the layer). Other layers (fp8, nvfp4, int8, a
    malformed non-int4 entry) are left untouched for the host's loader.
    """
    raw = state_dict.get(prefix + "comfy_quant")
    if raw is None or not (loading.names_int4(raw) or _has_int4_tensors(state_dict, prefix)):
        return None
    conf = formats.decode_config(raw, prefix.rstrip("."))
    return conf if conf["format"] in formats.FORMATS else None


def load_linear(module, state_dict, prefix, missing_keys) -> bool:
    """Load ``module`` from ``state_dict`` when ``prefix`` holds an int4 layer; False (nothing done) otherwise.

    Every tensor is found and checked before the module changes; the layer's keys (weight, side
    tensors, ``comfy_quant``, bias) are popped only then. A module built with a bias whose file has
    none reports ``<prefix>bias`` in ``missing_keys``.
    """
    conf = int4_entry(state_dict, prefix)
    if conf is None:
        return False
    layer = prefix.rstrip(".")
    device, compute_dtype = module.factory_kwargs["device"], module.factory_kwargs["dtype"]
    fmt = formats.get_format(conf["format"], layer)
    conf = fmt.parse_config(conf, layer)
    bias = checked_bias(module, state_dict.get(prefix + "bias"), layer)
    qt = fmt.load(state_dict, prefix, conf, module.out_features, module.in_features, compute_dtype, device)
    state_dict.pop(prefix + "comfy_quant")
    module.weight = as_parameter(qt)
    module.quant_format, module.layout_type, module.quant_layer_name = fmt.name, fmt.layout, layer
    if module.bias is not None:
        if bias is None:
            missing_keys.append(prefix + "bias")
        else:
            module.bias = torch.nn.Parameter(bias.to(device=device, dtype=compute_dtype), requires_grad=False)
            state_dict.pop(prefix + "bias")
    return True


def checked_bias(module, bias, layer):
    """``bias`` after the checks a linear's bias must pass: shape, float dtype, finite values
    (``QuantizedLayerError`` otherwise); None when absent."""
    if bias is None:
        return None
    if module.bias is None:
        raise QuantizedLayerError(layer, "bias", "no bias (layer built with bias=False)", tuple(bias.shape))
    if tuple(bias.shape) != (module.out_features,):
        raise QuantizedLayerError(layer, "bias", f"shape {(module.out_features,)}", tuple(bias.shape))
    if bias.dtype not in FLOAT_DTYPES:
        raise QuantizedLayerError(layer, "bias", f"a float dtype {FLOAT_DTYPES}", bias.dtype)
    check_finite(layer, "bias", bias)
    return bias


# ---- saving ----
# data_ptr of a packed weight -> (weakref to it, layer, format) for the layers whose last state dict left out
# a LoRA output term; ``warn_unsaved_terms`` looks a saved state dict's tensors (or views of them) up here.
# Hosts also call state_dict() only to list keys (LoRA key maps), so the warning waits for a save.
_UNSAVED_TERMS: dict = {}


def save_linear(module, destination, prefix) -> bool:
    """Write an int4 layer's tensors, bias and full ``comfy_quant`` JSON; False when the weight is not int4."""
    fmt = formats.format_of(module.weight)
    if fmt is None:
        return False
    tensors = fmt.state_dict(module.weight)
    packed = tensors["weight"]
    if output_terms(module.weight):
        _UNSAVED_TERMS[packed.data_ptr()] = (weakref.ref(packed), prefix.rstrip("."), fmt.name)
    else:
        _UNSAVED_TERMS.pop(packed.data_ptr(), None)
    for key, tensor in tensors.items():
        destination[prefix + key] = tensor
    destination[prefix + "comfy_quant"] = formats.encode_config(fmt.config_json(module.weight))
    if module.bias is not None:
        destination[prefix + "bias"] = module.bias.detach()
    return True


def warn_unsaved_terms(sd) -> None:
    """Warn once per save when ``sd`` (about to be written to a file) holds int4 layers whose LoRA output
    terms their state dict left out (the layout has no place for them)."""
    layers = []
    for t in sd.values():
        entry = _UNSAVED_TERMS.get(t.data_ptr()) if isinstance(t, torch.Tensor) and t.numel() else None
        if entry is not None and entry[0]() is not None:
            layers.append(f"{entry[1]} ({entry[2]})")
    if layers:
        logger.warning("saving %d int4 layer(s) without their LoRA output terms (their layout has no place for "
                       "them): %s; unpatch before saving, or save the LoRA separately", len(layers),
                       ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else ""))


# ---- running ----
def compute_dtype(weight) -> torch.dtype:
    """The dtype an int4 weight's side tensors (and so its input) are in."""
    return formats.format_of(weight).compute_dtype(weight)


def _add_output_terms(terms, input, out):
    for term in terms:
        out = out + term(input).to(out.dtype)
    return out


def linear_forward(module, input, weight=None, bias=None):
    """``module``'s output for ``input``: int4 ``weight`` (default ``module.weight``, or the copy a host
    cast onto the input's device) plus the output terms attached to ``module.weight``."""
    weight = module.weight if weight is None else weight
    dtype = compute_dtype(weight)
    x = input.to(dtype).contiguous()  # a strided view sends kitchen's W4A4 linear to an inexact dequantized fallback
    if weight.device != x.device:
        weight = weight.to(x.device)
    if weight.dtype != dtype:  # a host's .to(dtype) only relabels a QuantizedTensor; the kernel needs its own
        weight = weight.to(dtype)
    bias = module.bias if bias is None else bias
    if bias is not None:
        bias = bias.to(device=x.device, dtype=dtype)
    out = formats.format_of(weight).forward(x, weight, bias)
    return _add_output_terms(output_terms(module.weight), input, out).to(input.dtype)


def _forward_is_plain(module) -> bool:
    """True when calling ``module`` would run nothing but its own ``forward`` on its own weight.

    A bypass adapter (it replaces ``module.forward``), forward hooks, weight/bias functions (upstream's
    low-VRAM LoRA and weight wrappers) or a weight kept on another device all change what a call does,
    so a group containing such a module is run module by module.
    """
    if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
        return False
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return False
    if getattr(module, "weight_lowvram_function", None) or getattr(module, "bias_lowvram_function", None):
        return False
    if hasattr(module, "_v") or getattr(module, "comfy_force_cast_weights", False):
        return False  # dynamic-VRAM / force-cast modules stream their weights through the host's cast
    return not (torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def _shared_format(modules, device):
    """The format of ``modules``' weights if they all share one activation quantization on ``device``, else None."""
    weights = [getattr(m, "weight", None) for m in modules]
    fmt = formats.format_of(weights[0])
    if fmt is None or any(formats.format_of(w) is not fmt for w in weights[1:]):
        return None
    if any(w.device != device for w in weights) or not all(_forward_is_plain(m) for m in modules):
        return None
    keys = {fmt.share_key(w) for w in weights}
    return fmt if len(keys) == 1 and None not in keys else None


def run_linear_group(input, modules):
    """``tuple(m(input) for m in modules)``, quantizing the shared activation once where the format can."""
    fmt = _shared_format(modules, input.device)
    if fmt is None:
        return tuple(m(input) for m in modules)
    dtype = compute_dtype(modules[0].weight)
    x = input.to(dtype)
    biases = [None if m.bias is None else m.bias.to(device=x.device, dtype=dtype) for m in modules]
    outs = fmt.grouped_forward(x, [m.weight for m in modules], biases)
    return tuple(_add_output_terms(output_terms(m.weight), input, out).to(input.dtype)
                 for m, out in zip(modules, outs))


# ---- moves ----
_MOVED: dict = {}  # (id(source), device) -> (weakref(source), weakref(copy)): the live copy of a tensor on a device


def _moved_tensor(t, device):
    """``t`` on ``device``, reusing a copy made earlier while it is alive (so shared tensors stay shared)."""
    if t.device == device:
        return t
    key = (id(t), device)
    hit = _MOVED.get(key)
    copy = hit[1]() if hit is not None and hit[0]() is t else None
    if copy is None:
        copy = t.to(device)
        _MOVED[key] = (weakref.ref(t, lambda _, key=key: _MOVED.pop(key, None)), weakref.ref(copy))
    return copy


def move_weight(param, fn) -> torch.nn.Parameter:
    """``param`` moved the way ``fn`` (a ``Module._apply`` function) moves tensors, keeping ties.

    Only the device changes (kitchen's ``.to(dtype)`` relabels, it never converts side tensors).
    A tensor shared between sibling weights (q/k/v's smoothing and ``proj_down``) gets one copy per
    device while that copy is alive, however the modules are moved (one ``model.to()`` or module by
    module, as ComfyUI's loaders do); int4 tensors are never written in place, so a copy stays valid.
    Output terms and the patched mark travel with the weight.
    """
    qt = param
    device = fn(qt._qdata[:0]).device  # where fn sends tensors, learnt from an empty view (nothing copied)
    if qt._qdata.device == device:  # int4 tensors always move together: nothing to do
        return param
    p = qt._params
    fields = {f: _moved_tensor(getattr(p, f), device) for f in p._tensor_fields()
              if isinstance(getattr(p, f), torch.Tensor)}
    new = kitchen.QuantizedTensor(_moved_tensor(qt._qdata, device), qt._layout_cls, dataclasses.replace(p, **fields))
    out = as_parameter(new, output_terms(param))
    if hasattr(param, "int4_base"):  # a patched weight stays marked as such (comfy.quant.patching)
        out.int4_base = param.int4_base
    return out


def tie_shared_quant(model: torch.nn.Module) -> int:
    """Make sibling int4 linears whose stored activation parameters are equal hold the same tensors.

    Sharing tensors (rather than equal copies) is what lets ``run_linear_group`` quantize a common
    input once (q/k/v of an attention). Siblings are the direct children of one module; only formats
    with a ``tie`` method take part. Returns the number of groups of two or more that were tied.
    """
    tied = 0
    for parent in model.modules():
        for fmt, members in _tie_buckets(parent):
            if len(members) < 2:
                continue
            for m, w in zip(members, fmt.tie([m.weight for m in members])):
                m.weight = as_parameter(w, output_terms(m.weight))
            tied += 1
    return tied


def _tie_buckets(parent):
    buckets = []  # [format, [modules]]
    for child in parent.children():
        fmt = formats.format_of(getattr(child, "weight", None))
        if fmt is None or not hasattr(fmt, "tie"):
            continue
        for bucket in buckets:
            if bucket[0] is fmt and fmt.can_tie([bucket[1][0].weight, child.weight]):
                bucket[1].append(child)
                break
        else:
            buckets.append([fmt, [child]])
    return buckets

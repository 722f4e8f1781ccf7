"""Runtime of a linear whose weight may be int4: load, save, forward, grouped forward, output terms.

``QuantizedLinearMixin`` is mixed into ``MixedPrecisionOps.Linear`` (``comfy/ops.py``). The weight
is a kitchen ``QuantizedTensor`` (any registered format) or a plain compute-dtype tensor; extra
additive output terms (LoRA on AWQ layers, dense deltas) live in ``output_deltas``.
"""
from __future__ import annotations

import logging

import torch

from comfy.quant import formats, kitchen
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats.base import FLOAT_DTYPES

logger = logging.getLogger(__name__)


def add_output_deltas(module, input, out):
    terms = module._modules.get("output_deltas")
    if terms is None:
        return out
    for term in terms:
        out = out + term(input).to(out.dtype)
    return out


class QuantizedLinearMixin:
    """Loading, saving and running of one linear layer; ``self`` is a ``torch.nn.Module``."""

    quant_layer_name = "?"

    # ---- loading ----
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layer = prefix.rstrip(".")
        self.quant_layer_name = layer
        device = self.factory_kwargs["device"]
        compute_dtype = self._compute_dtype
        raw = state_dict.get(prefix + "comfy_quant")
        bias = self._checked_bias(state_dict.get(prefix + "bias"), layer)
        if raw is None:
            weight = state_dict.get(prefix + "weight")
            if weight is None:
                missing_keys.append(prefix + "weight")
                return
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise QuantizedLayerError(layer, "weight", f"shape {(self.out_features, self.in_features)}",
                                          tuple(weight.shape))
            weight = torch.nn.Parameter(weight.to(device=device, dtype=compute_dtype), requires_grad=False)
            state_dict.pop(prefix + "weight")
        else:
            fmt, conf = formats.resolve(raw, layer)
            weight = kitchen.as_parameter(fmt.load(state_dict, prefix, conf, self.out_features, self.in_features,
                                                   compute_dtype, device))
            state_dict.pop(prefix + "comfy_quant")
        # everything checked: only now is the module changed
        self.weight = weight
        if self.bias is not None:
            if bias is None:
                missing_keys.append(prefix + "bias")
            else:
                self.bias = torch.nn.Parameter(bias.to(device=device, dtype=compute_dtype), requires_grad=False)
                state_dict.pop(prefix + "bias")

    def _checked_bias(self, bias, layer):
        if bias is None:
            return None
        if self.bias is None:
            raise QuantizedLayerError(layer, "bias", "no bias (layer built with bias=False)", tuple(bias.shape))
        if tuple(bias.shape) != (self.out_features,):
            raise QuantizedLayerError(layer, "bias", f"shape {(self.out_features,)}", tuple(bias.shape))
        if bias.dtype not in FLOAT_DTYPES:
            raise QuantizedLayerError(layer, "bias", f"a float dtype {FLOAT_DTYPES}", bias.dtype)
        return bias

    # ---- saving ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        fmt = formats.format_of(self.weight)
        if fmt is None:
            if self.weight is not None:
                destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        else:
            for key, tensor in fmt.state_dict(self.weight).items():
                destination[prefix + key] = tensor
            destination[prefix + "comfy_quant"] = formats.encode_config(fmt.config_json(self.weight))
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    # ---- running ----
    @property
    def quant_format(self):
        return formats.format_of(self.weight)

    def _weight_on(self, device):
        w = self.weight
        return w if w.device == device else w.to(device)

    def _bias_on(self, device, dtype):
        b = self.bias
        return None if b is None else b.to(device=device, dtype=dtype)

    def forward(self, input):
        if formats.format_of(self.weight) is not None:
            x = input.to(self._compute_dtype)
            out = torch.nn.functional.linear(x, self._weight_on(x.device), self._bias_on(x.device, x.dtype))
        else:
            out = torch.nn.functional.linear(input, self.weight.to(device=input.device, dtype=input.dtype),
                                             self._bias_on(input.device, input.dtype))
        return add_output_deltas(self, input, out)

    def add_output_term(self, term: torch.nn.Module) -> None:
        """Append an additive output term; rebinding (not mutating) keeps the patcher's backup valid."""
        terms = list(self._modules.get("output_deltas") or [])
        self.output_deltas = torch.nn.ModuleList(terms + [term])


def _shared_format(modules):
    """The format of ``modules``' weights if they all share one activation quantization, else None."""
    weights = [getattr(m, "weight", None) for m in modules]
    fmt = formats.format_of(weights[0])
    if fmt is None or any(formats.format_of(w) is not fmt for w in weights[1:]):
        return None
    keys = {fmt.share_key(w) for w in weights}
    return fmt if len(keys) == 1 and None not in keys else None


def run_linear_group(input, modules):
    """``tuple(m(input) for m in modules)``, quantizing the shared activation once where the format can."""
    fmt = _shared_format(modules)
    if fmt is None:
        return tuple(m(input) for m in modules)
    x = input.to(modules[0]._compute_dtype)
    weights = [m._weight_on(x.device) for m in modules]
    biases = [m._bias_on(x.device, x.dtype) for m in modules]
    outs = fmt.grouped_forward(x, weights, biases)  # sharing was checked on the resident weights above
    return tuple(add_output_deltas(m, input, out) for m, out in zip(modules, outs))


def tie_shared_quant(model: torch.nn.Module) -> int:
    """Make sibling int4 linears whose stored activation parameters are equal hold the same tensors.

    Sharing tensors (rather than equal copies) is what lets ``run_linear_group`` quantize a common
    input once (q/k/v of an attention). Siblings are the direct children of one module; only formats
    with a ``tie`` method take part. Returns the number of groups of two or more that were tied.
    """
    tied = 0
    for parent in model.modules():
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
        for fmt, members in buckets:
            if len(members) < 2:
                continue
            for m, w in zip(members, fmt.tie([m.weight for m in members])):
                m.weight = kitchen.as_parameter(w)
            tied += 1
    return tied

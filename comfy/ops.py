"""Operation classes a model is built with (mirrors upstream ``comfy/ops.py``).

``disable_weight_init`` skips torch's random init (weights come from a file), ``manual_cast`` casts
weights to the input's dtype at call time, and ``mixed_precision_ops`` builds the class whose
``Linear`` loads per-layer quantized weights (``comfy_quant`` metadata) and runs them through
comfy-kitchen. Everything int4-specific lives in ``comfy.quant``; this module only routes to it.
"""
from __future__ import annotations

import logging

import torch

from comfy.quant import formats
from comfy.quant import host as int4
from comfy.quant.errors import QuantizedLayerError

logger = logging.getLogger(__name__)


def cast_to(tensor, dtype=None, device=None):
    if tensor is None:
        return None
    if (dtype is None or tensor.dtype == dtype) and (device is None or tensor.device == device):
        return tensor
    return tensor.to(device=device, dtype=dtype)


def cast_bias_weight(module, input=None, dtype=None, device=None):
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        device = input.device if device is None else device
    weight = cast_to(module.weight, dtype, device)
    bias = cast_to(module.bias, dtype, device)
    return weight, bias


class CastWeightBiasOp:
    comfy_cast_weights = False


class disable_weight_init:
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight, bias)

        def forward(self, input):
            if self.comfy_cast_weights:
                return self.forward_comfy_cast_weights(input)
            return super().forward(input)

    class LayerNorm(torch.nn.LayerNorm, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.weight is None:
                return torch.nn.functional.layer_norm(input, self.normalized_shape, None, None, self.eps)
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    class RMSNorm(torch.nn.Module, CastWeightBiasOp):
        def __init__(self, normalized_shape, eps=1e-6, elementwise_affine=True, device=None, dtype=None):
            super().__init__()
            if isinstance(normalized_shape, int):
                normalized_shape = (normalized_shape,)
            self.normalized_shape = tuple(normalized_shape)
            self.eps = eps
            if elementwise_affine:
                self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("weight", None)
            self.bias = None

        def forward(self, input):
            weight = cast_to(self.weight, input.dtype, input.device)
            return torch.nn.functional.rms_norm(input, self.normalized_shape, weight, self.eps)

    class Embedding(torch.nn.Embedding, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, input, out_dtype=None):
            out = super().forward(input)
            return out if out_dtype is None else out.to(out_dtype)


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class LayerNorm(disable_weight_init.LayerNorm):
        comfy_cast_weights = True

    class RMSNorm(disable_weight_init.RMSNorm):
        comfy_cast_weights = True

    class Embedding(disable_weight_init.Embedding):
        comfy_cast_weights = True


def run_linear_group(input, modules):
    """Apply several linears to the same input: ``tuple(m(input) for m in modules)``.

    Models call this where sibling projections read one activation (q/k/v). When the siblings hold
    int4 weights whose format can share the activation quantization, the format runs them together.
    """
    return int4.run_linear_group(input, modules)


def mixed_precision_ops(quant_config=None, compute_dtype=torch.bfloat16, full_precision_mm=False, disabled=()):
    """The ops class for a file that carries per-layer ``comfy_quant`` metadata."""

    class MixedPrecisionOps(manual_cast):
        _quant_config = quant_config or {}
        _compute_dtype = compute_dtype

        class Linear(torch.nn.Module, CastWeightBiasOp):
            comfy_cast_weights = True

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                super().__init__()
                self.in_features = in_features
                self.out_features = out_features
                self.factory_kwargs = {"device": device, "dtype": MixedPrecisionOps._compute_dtype}
                self.weight = None
                if bias:
                    self.bias = torch.nn.Parameter(torch.empty(out_features, **self.factory_kwargs),
                                                   requires_grad=False)
                else:
                    self.register_parameter("bias", None)

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                if int4.load_linear(self, state_dict, prefix, missing_keys):
                    return
                layer = prefix.rstrip(".")
                if prefix + "comfy_quant" in state_dict:  # a format no loader here knows: say which
                    formats.resolve(state_dict[prefix + "comfy_quant"], layer)
                weight = state_dict.get(prefix + "weight")
                if weight is None:
                    missing_keys.append(prefix + "weight")
                    return
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    raise QuantizedLayerError(layer, "weight", f"shape {(self.out_features, self.in_features)}",
                                              tuple(weight.shape))
                bias = int4.checked_bias(self, state_dict.get(prefix + "bias"), layer)
                # everything checked: only now is the module changed
                self.weight = torch.nn.Parameter(state_dict.pop(prefix + "weight").to(**self.factory_kwargs),
                                                 requires_grad=False)
                if self.bias is not None:
                    if bias is None:
                        missing_keys.append(prefix + "bias")
                    else:
                        self.bias = torch.nn.Parameter(state_dict.pop(prefix + "bias").to(**self.factory_kwargs),
                                                       requires_grad=False)

            def _save_to_state_dict(self, destination, prefix, keep_vars):
                if int4.save_linear(self, destination, prefix):
                    return
                if self.weight is not None:
                    destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
                if self.bias is not None:
                    destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

            def forward(self, input):
                if int4.is_int4(self.weight):
                    return int4.linear_forward(self, input)
                weight, bias = cast_bias_weight(self, input)
                return torch.nn.functional.linear(input, weight, bias)

            def _apply(self, fn, recurse=True):
                weight = self.weight
                if not int4.is_int4(weight):
                    return super()._apply(fn, recurse)
                self._parameters.pop("weight")
                try:
                    super()._apply(fn, recurse)
                finally:
                    self.weight = int4.move_weight(weight, fn)
                return self

    return MixedPrecisionOps


def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False,
                    fp8_optimizations=False, model_config=None):
    quant_config = getattr(model_config, "quant_config", None) if model_config is not None else None
    if quant_config is not None:
        logger.info("Using mixed precision operations: file carries quantized layers")
        return mixed_precision_ops(quant_config, compute_dtype)
    if weight_dtype is None or weight_dtype == compute_dtype:
        return disable_weight_init
    return manual_cast

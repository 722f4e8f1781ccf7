"""Common base of the weight adapters (mirrors upstream ``comfy/weight_adapter/base.py``).

Every adapter describes a weight delta ``ΔW`` read from a LoRA-style file. Besides the upstream
dense merge (``calculate_weight``: ``weight += strength * ΔW``, with DoRA when a ``dora_scale`` is
present) each adapter exposes the delta without touching the base weight, which is what an int4
layer needs (the project never requantizes int4 weights):

* ``low_rank()``   -> ``(up (N, r), down (r, K), scale)`` in fp32 with ``ΔW = scale * up @ down``,
  or ``None`` when the adapter is not exactly low rank in factor form;
* ``delta_weight(shape, dtype)`` -> dense ``ΔW`` (alpha scaling included, strength NOT included);
* ``delta_shape()`` -> the 2-D ``(N, K)`` shape of ``ΔW`` computed from factor shapes only;
* ``dora_scale`` -> the DoRA magnitude vector, or ``None``.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def cast_to_device(tensor, device, dtype, copy=False):
    """``tensor`` on ``device`` in ``dtype`` (a copy when ``copy`` is set or a conversion is needed)."""
    if tensor is None:
        return None
    if device is None:
        device = tensor.device
    if dtype is None:
        dtype = tensor.dtype
    return tensor.to(device=device, dtype=dtype, copy=copy)


def shape_matches(delta_shape, target_shape) -> bool:
    """Whether a delta of 2-D shape ``(N, K)`` can be laid onto a weight of ``target_shape``.

    A 2-D target must be exactly ``(N, K)``; an n-D (conv) target ``(N, *rest)`` needs
    ``K == prod(rest)``; a 1-D target needs ``N * K`` elements.
    """
    n, k = int(delta_shape[0]), int(delta_shape[1])
    target_shape = tuple(int(s) for s in target_shape)
    if len(target_shape) == 0:
        return n * k == 1
    if len(target_shape) == 1:
        return n * k == target_shape[0]
    return n == target_shape[0] and k == math.prod(target_shape[1:])


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, intermediate_dtype, function):
    """DoRA merge (same math as upstream): the merged weight ``W + alpha * ΔW`` is renormalised per
    input column (norm over every dim except dim 1) and rescaled by ``dora_scale``; ``strength``
    interpolates between the original and the DoRA weight. Writes into ``weight`` in place."""
    dora_scale = cast_to_device(dora_scale, weight.device, intermediate_dtype)
    lora_diff = lora_diff * alpha
    weight_calc = weight.to(intermediate_dtype) + function(lora_diff).to(intermediate_dtype)
    dims = [d for d in range(weight_calc.dim()) if d != 1]
    if dims:
        weight_norm = torch.linalg.vector_norm(weight_calc, dim=dims, keepdim=True)
    else:
        weight_norm = weight_calc.abs()
    weight_calc = weight_calc * (dora_scale.reshape(weight_norm.shape) / weight_norm)
    if strength != 1.0:
        weight += (strength * (weight_calc - weight.to(intermediate_dtype))).to(weight.dtype)
    else:
        weight.copy_(weight_calc.to(weight.dtype))
    return weight


def pad_tensor_to_shape(tensor: torch.Tensor, new_shape) -> torch.Tensor:
    """Zero-pad ``tensor`` up to ``new_shape`` (every dim must grow or stay)."""
    new_shape = list(new_shape)
    if len(new_shape) != tensor.dim():
        raise ValueError("The new shape must have the same number of dimensions as the original tensor")
    if any(new_shape[i] < tensor.shape[i] for i in range(len(new_shape))):
        raise ValueError("The new shape must be larger than the original tensor in all dimensions")
    out = torch.zeros(new_shape, dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def tucker_weight(wa, wb, t):
    """Rebuild ``(out, in, *kernel)`` from a Tucker core ``t`` (r, r, *kernel), ``wa`` (r, out),
    ``wb`` (r, in) (the LyCORIS CP/Tucker layout)."""
    return torch.einsum("ij...,jr,ip->pr...", t, wb, wa)


class WeightAdapterBase:
    """A weight delta loaded from a LoRA file for one target weight."""

    name: str = "base"
    loaded_keys: set
    weights: tuple
    dora_scale: Optional[torch.Tensor] = None

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    # ---------------------------------------------------------------- delta in factor-free form
    def _delta(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Unscaled delta (before ``alpha / rank``) in its natural shape (2-D or conv-shaped)."""
        raise NotImplementedError

    def alpha_scale(self) -> float:
        """The ``alpha / rank`` factor (1.0 when the file carries no alpha)."""
        return 1.0

    def delta_shape(self) -> tuple:
        """2-D ``(N, K)`` shape of ΔW (conv kernels folded into K), from factor shapes only."""
        raise NotImplementedError

    def shape_matches(self, target_shape) -> bool:
        return shape_matches(self.delta_shape(), target_shape)

    def low_rank(self, device=None):
        """``(up (N, r) fp32, down (r, K) fp32, scale)`` with ``ΔW = scale * up @ down``, or None."""
        return None

    def delta_weight(self, shape=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """Dense ΔW including the alpha scaling, excluding strength, computed in fp32.

        ``shape`` is the target weight shape (``(N, K)`` for a linear); ``None`` returns the 2-D
        ``(N, K)`` form. Raises ``ValueError`` when the delta cannot take that shape."""
        n, k = self.delta_shape()
        if shape is None:
            shape = (n, k)
        shape = tuple(int(s) for s in shape)
        if not shape_matches((n, k), shape):
            raise ValueError("{} delta of shape {} does not fit a weight of shape {}".format(
                self.name, (n, k), shape))
        delta = self._delta(device=device, dtype=torch.float32) * self.alpha_scale()
        return delta.reshape(shape).to(dtype)

    # ----------------------------------------------------------------------- bypass form h(x)
    def h(self, x: torch.Tensor, base_out: torch.Tensor = None) -> torch.Tensor:
        """Adapter output on a linear layer input, ``x @ ΔWᵀ`` (times ``self.multiplier`` when
        set), computed without reading the base weight. Linear targets only."""
        multiplier = getattr(self, "multiplier", 1.0)
        lr = self.low_rank(device=x.device)
        if lr is not None:
            up, down, scale = lr
            out = F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
            return out * (scale * multiplier)
        delta = self.delta_weight(None, dtype=x.dtype, device=x.device)
        return F.linear(x, delta) * multiplier

    # ---------------------------------------------------------------------- upstream dense merge
    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weights=None):
        """Upstream dense merge: ``weight += function(strength * alpha * ΔW)`` in place (DoRA when
        ``dora_scale`` is set). A delta whose shape does not fit ``weight`` is logged with
        ``logging.error`` and skipped, leaving ``weight`` untouched."""
        if function is None:
            function = lambda a: a  # noqa: E731
        try:
            got = self.delta_shape()
        except Exception as e:  # malformed factors
            logger.error("ERROR {} {}: cannot read the adapter's shape ({})".format(self.name, key, e))
            return weight
        if not shape_matches(got, weight.shape):
            logger.error("ERROR {} {}: shape mismatch, expected {} got {}; LoRA not applied to this "
                          "weight".format(self.name, key, tuple(weight.shape), tuple(got)))
            return weight
        try:
            lora_diff = self._delta(device=weight.device, dtype=intermediate_dtype).reshape(weight.shape)
            alpha = self.alpha_scale()
            if self.dora_scale is not None:
                weight = weight_decompose(self.dora_scale, weight, lora_diff, alpha, strength,
                                          intermediate_dtype, function)
            else:
                weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        except Exception as e:
            logger.error("ERROR {} {} {}".format(self.name, key, e))
        return weight

    def __repr__(self):
        try:
            shape = self.delta_shape()
        except Exception:
            shape = "?"
        return "<{} {} dora={}>".format(type(self).__name__, shape, self.dora_scale is not None)

"""LoKr adapter (mirrors upstream ``comfy/weight_adapter/lokr.py``).

ΔW = scale * kron(w1, w2), w1 = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, w2 = ``lokr_w2`` or
``lokr_w2_a @ lokr_w2_b`` (or the Tucker form with ``lokr_t2``). As upstream, alpha only applies
when a factorised part exists: scale = alpha / dim with dim = ``w2_b.shape[0]`` when w2 is
factorised, else ``w1_b.shape[0]``; with both parts full (or no alpha) scale is 1.
A Kronecker product is not low rank in factor form, so ``low_rank()`` is None.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import WeightAdapterBase, cast_to_device, tucker_weight

_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        # upstream layout: (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale)
        self.weights = weights
        self.dora_scale = weights[8]

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None) -> Optional["LoKrAdapter"]:
        if loaded_keys is None:
            loaded_keys = set()
        found = {p: lora.get("{}.{}".format(x, p)) for p in _PARTS}
        has_w1 = found["lokr_w1"] is not None or (found["lokr_w1_a"] is not None and found["lokr_w1_b"] is not None)
        has_w2 = found["lokr_w2"] is not None or (found["lokr_w2_a"] is not None and found["lokr_w2_b"] is not None)
        if not (has_w1 and has_w2):
            return None
        for p, t in found.items():
            if t is not None:
                loaded_keys.add("{}.{}".format(x, p))
        weights = (found["lokr_w1"], found["lokr_w2"], alpha, found["lokr_w1_a"], found["lokr_w1_b"],
                   found["lokr_w2_a"], found["lokr_w2_b"], found["lokr_t2"], dora_scale)
        return cls(loaded_keys, weights)

    def _scale_dim(self):
        w1, w2, _alpha, w1_a, w1_b, w2_a, w2_b = self.weights[:7]
        dim = None
        if w1 is None:
            dim = int(w1_b.shape[0])
        if w2 is None:
            dim = int(w2_b.shape[0])
        return dim

    def alpha_scale(self) -> float:
        alpha = self.weights[2]
        dim = self._scale_dim()
        if alpha is None or dim is None:
            return 1.0
        return float(alpha) / dim

    def delta_shape(self):
        w1, w2, _alpha, w1_a, w1_b, w2_a, w2_b, t2 = self.weights[:8]
        if w1 is not None:
            n1, k1 = int(w1.shape[0]), int(math.prod(w1.shape[1:]))
        else:
            n1, k1 = int(w1_a.shape[0]), int(w1_b.shape[1])
        if w2 is not None:
            n2, k2 = int(w2.shape[0]), int(math.prod(w2.shape[1:]))
        elif t2 is not None:
            n2, k2 = int(w2_a.shape[1]), int(w2_b.shape[1]) * math.prod(t2.shape[2:])
        else:
            n2, k2 = int(w2_a.shape[0]), int(w2_b.shape[1])
        return (n1 * n2, k1 * k2)

    def _delta(self, device=None, dtype=torch.float32):
        w1, w2, _alpha, w1_a, w1_b, w2_a, w2_b, t2 = (cast_to_device(t, device, dtype) if torch.is_tensor(t) else t
                                                      for t in self.weights[:8])
        if w1 is None:
            w1 = w1_a @ w1_b
        if w2 is None:
            if t2 is None:
                w2 = w2_a @ w2_b
            else:
                w2 = tucker_weight(w2_a, w2_b, t2)
        if w2.dim() > 2 and w1.dim() < w2.dim():
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
        return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs: an einsum result fails

"""LoHa adapter (mirrors upstream ``comfy/weight_adapter/loha.py``).

ΔW = (alpha / rank) * (w1a @ w1b) ⊙ (w2a @ w2b), rank = w1b.shape[0]; with the Tucker cores
``hada_t1``/``hada_t2`` each factor is rebuilt as ``einsum(t, wb, wa)`` (conv layers). A Hadamard
product of two rank-r matrices is not low rank in factor form, so ``low_rank()`` is None.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import WeightAdapterBase, cast_to_device, tucker_weight


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        # upstream layout: (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale)
        self.weights = weights
        self.dora_scale = weights[7]

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None) -> Optional["LoHaAdapter"]:
        if loaded_keys is None:
            loaded_keys = set()
        names = ["{}.hada_w1_a".format(x), "{}.hada_w1_b".format(x),
                 "{}.hada_w2_a".format(x), "{}.hada_w2_b".format(x)]
        if not all(n in lora for n in names):
            return None
        t1_name, t2_name = "{}.hada_t1".format(x), "{}.hada_t2".format(x)
        t1 = t2 = None
        if t1_name in lora and t2_name in lora:
            t1, t2 = lora[t1_name], lora[t2_name]
            loaded_keys.add(t1_name)
            loaded_keys.add(t2_name)
        loaded_keys.update(names)
        w1a, w1b, w2a, w2b = (lora[n] for n in names)
        return cls(loaded_keys, (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale))

    def alpha_scale(self) -> float:
        alpha = self.weights[2]
        if alpha is None:
            return 1.0
        return float(alpha) / int(self.weights[1].shape[0])

    def delta_shape(self):
        w1a, w1b, _alpha, w2a, w2b, t1, t2 = self.weights[:7]
        if t1 is not None:
            return (int(w1a.shape[1]), int(w1b.shape[1]) * math.prod(t1.shape[2:]))
        return (int(w1a.shape[0]), int(math.prod(w1b.shape[1:])))

    def _delta(self, device=None, dtype=torch.float32):
        w1a, w1b, _alpha, w2a, w2b, t1, t2 = (cast_to_device(t, device, dtype) if torch.is_tensor(t) else t
                                              for t in self.weights[:7])
        if t1 is not None:
            m1 = tucker_weight(w1a, w1b, t1)
            m2 = tucker_weight(w2a, w2b, t2)
        else:
            m1 = w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)
            m2 = w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)
        return m1 * m2

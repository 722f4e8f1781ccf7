"""LoRA / LoCon adapter (mirrors upstream ``comfy/weight_adapter/lora.py``).

ΔW = (alpha / rank) * up @ down, up (N, r) ("lora_up" / "lora_B"), down (r, K) ("lora_down" /
"lora_A"); an optional LoCon ``lora_mid`` (r, r, *kernel) sits between them and is folded into down.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import WeightAdapterBase, cast_to_device

# (up name, down name, mid name or None) per naming convention, in upstream's lookup order.
_LORA_NAMES = (
    ("{}.lora_up.weight", "{}.lora_down.weight", "{}.lora_mid.weight"),  # kohya / ComfyUI
    ("{}_lora.up.weight", "{}_lora.down.weight", None),  # old diffusers
    ("{}.lora_B.weight", "{}.lora_A.weight", None),  # diffusers / PEFT
    ("{}.lora.up.weight", "{}.lora.down.weight", None),  # diffusers (lora.up / lora.down)
    ("{}.lora_B", "{}.lora_A", None),  # mochi
    ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight", None),  # transformers
    ("{}.lora_B.default.weight", "{}.lora_A.default.weight", None),  # PEFT in-memory naming
)


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        # upstream layout: (up, down, alpha, mid, dora_scale, reshape)
        self.weights = weights
        self.dora_scale = weights[4]

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None) -> Optional["LoRAAdapter"]:
        if loaded_keys is None:
            loaded_keys = set()
        for up_fmt, down_fmt, mid_fmt in _LORA_NAMES:
            up_name, down_name = up_fmt.format(x), down_fmt.format(x)
            if up_name not in lora or down_name not in lora:
                continue
            mid = None
            if mid_fmt is not None and mid_fmt.format(x) in lora:
                mid = lora[mid_fmt.format(x)]
                loaded_keys.add(mid_fmt.format(x))
            loaded_keys.add(up_name)
            loaded_keys.add(down_name)
            return cls(loaded_keys, (lora[up_name], lora[down_name], alpha, mid, dora_scale, None))
        return None

    # ---------------------------------------------------------------------------------- factors
    def _factors(self, device=None, dtype=torch.float32):
        """2-D ``up (N, r)`` and ``down (r, K)`` with ``lora_mid`` folded into ``down``."""
        up, down, _alpha, mid = self.weights[:4]
        up = cast_to_device(up, device, dtype)
        down = cast_to_device(down, device, dtype)
        up2 = up.reshape(up.shape[0], -1)
        if mid is None:
            down2 = down.reshape(down.shape[0], -1)
        else:
            # down: (r_in, K_in[, 1, 1]), mid: (r_out, r_in, *kernel) -> (r_out, K_in * prod(kernel)),
            # conv kernel dims kept after the input channel as in a conv weight (o, c, kh, kw).
            mid = cast_to_device(mid, device, dtype)
            down_flat = down.reshape(down.shape[0], -1)
            down2 = torch.einsum("oi...,ic->oc...", mid, down_flat).reshape(mid.shape[0], -1)
        return up2, down2

    def rank(self) -> int:
        up, down, _alpha, mid = self.weights[:4]
        return int(mid.shape[0]) if mid is not None else int(down.shape[0])

    def alpha_scale(self) -> float:
        alpha = self.weights[2]
        if alpha is None:
            return 1.0
        return float(alpha) / self.rank()

    def delta_shape(self):
        up, down, _alpha, mid = self.weights[:4]
        n = int(up.shape[0])
        if mid is None:
            k = math.prod(down.shape[1:])
        else:
            k = math.prod(down.shape[1:]) * math.prod(mid.shape[2:])
        return (n, int(k))

    def low_rank(self, device=None):
        up, down = self._factors(device=device, dtype=torch.float32)
        if up.shape[1] != down.shape[0]:
            raise ValueError("LoRA up {} and down {} ranks differ".format(tuple(up.shape), tuple(down.shape)))
        return up.contiguous(), down.contiguous(), self.alpha_scale()

    def _delta(self, device=None, dtype=torch.float32):
        up, down = self._factors(device=device, dtype=dtype)
        return up @ down

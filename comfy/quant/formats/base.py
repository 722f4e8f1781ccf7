"""What every int4 format knows: its tensors, its layer JSON, how to load, save and take a LoRA delta.

A format is a stateless object registered by name (``comfy.quant.formats``). Host code (ops, the
model patcher, the inspector) asks the format instead of branching on format names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from comfy.quant import kitchen
from comfy.quant.errors import QuantizedLayerError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TensorSlot:
    """One stored tensor of a quantized layer, as a suffix of ``<layer>.``."""

    key: str                        # canonical key, written on save
    aliases: tuple[str, ...] = ()   # other spellings accepted on load
    packed: bool = False            # int8 packed codes (kept as stored) vs float side tensor (cast)

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)


class QuantFormat:
    """Base class: subclasses set the class attributes and implement the layout-specific parts."""

    name: ClassVar[str]
    layout: ClassVar[str]                 # kitchen layout class name
    slots: ClassVar[tuple[TensorSlot, ...]]
    storage_dtype: ClassVar[torch.dtype] = torch.int8
    quantize_input: ClassVar[bool] = False
    default_group_size: ClassVar[int] = 64

    # ---- registry facts ----
    @property
    def available(self) -> bool:
        return kitchen.layout_class(self.layout) is not None

    def algo_entry(self) -> dict:
        """This format's ``QUANT_ALGOS`` entry, in upstream's shape."""
        return {
            "storage_t": self.storage_dtype,
            "parameters": {s.key for s in self.slots if s.key != "weight"},
            "comfy_tensor_layout": self.layout,
            "group_size": self.default_group_size,
            "quantize_input": self.quantize_input,
        }

    # ---- layer JSON ----
    def parse_config(self, conf: dict, layer: str) -> dict:
        """Validated, completed layer config (a plain dict; keys are format-specific)."""
        raise NotImplementedError

    def config_json(self, qt) -> dict:
        """The ``comfy_quant`` JSON describing a loaded weight."""
        raise NotImplementedError

    # ---- loading ----
    def find_tensors(self, state_dict: dict, prefix: str, layer: str) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Every slot's tensor (under any spelling) and the file keys they came from; nothing is popped."""
        found, keys = {}, []
        for slot in self.slots:
            present = [k for k in slot.spellings if prefix + k in state_dict]
            if not present:
                raise QuantizedLayerError(layer, slot.key, f"a tensor (any of {list(slot.spellings)})", "nothing")
            if len(present) > 1:
                raise QuantizedLayerError(layer, slot.key, "one spelling", f"both {present}")
            found[slot.key] = state_dict[prefix + present[0]]
            keys.append(prefix + present[0])
        return found, keys

    def expected_shapes(self, out_features: int, in_features: int, conf: dict,
                        tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def input_group_size(self, conf: dict) -> int:
        """Input channels per quantization group; ``in_features`` must be a multiple of it."""
        return conf.get("group_size", self.default_group_size)

    def validate(self, layer: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 conf: dict) -> None:
        group = self.input_group_size(conf)
        if in_features % group:
            raise QuantizedLayerError(layer, "weight", f"in_features a multiple of the group size {group}",
                                      in_features)
        for slot in self.slots:
            t = tensors[slot.key]
            if slot.packed:
                if t.dtype not in (torch.int8, torch.uint8):
                    raise QuantizedLayerError(layer, slot.key, "dtype int8 (packed int4)", t.dtype)
            elif t.dtype not in FLOAT_DTYPES:
                raise QuantizedLayerError(layer, slot.key, f"a float dtype {FLOAT_DTYPES}", t.dtype)
        for key, shape in self.expected_shapes(out_features, in_features, conf, tensors).items():
            if tuple(tensors[key].shape) != tuple(shape):
                raise QuantizedLayerError(layer, key, f"shape {tuple(shape)}", tuple(tensors[key].shape))

    def layout_params(self, side: dict[str, torch.Tensor], conf: dict) -> dict:
        """Format-specific fields of the kitchen layout's ``Params`` from the cast side tensors."""
        raise NotImplementedError

    def build(self, tensors: dict[str, torch.Tensor], conf: dict, out_features: int, in_features: int,
              compute_dtype: torch.dtype, device=None):
        """The kitchen ``QuantizedTensor`` for validated tensors (side tensors cast to compute dtype)."""
        side = {s.key: tensors[s.key].to(device=device, dtype=compute_dtype).contiguous()
                for s in self.slots if not s.packed}
        params = kitchen.layout_class(self.layout).Params(
            orig_dtype=compute_dtype, orig_shape=(out_features, in_features), **self.layout_params(side, conf))
        qdata = tensors["weight"].view(torch.int8).to(device=device).contiguous()
        return kitchen.QuantizedTensor(qdata, self.layout, params)

    def load(self, state_dict: dict, prefix: str, conf: dict, out_features: int, in_features: int,
             compute_dtype: torch.dtype, device=None):
        layer = prefix.rstrip(".")
        if not self.available:
            raise ValueError(f"quantized layer '{layer}': format '{self.name}' is unavailable: "
                             f"{kitchen.missing_layout_reason(self.layout)}")
        tensors, keys = self.find_tensors(state_dict, prefix, layer)
        self.validate(layer, tensors, out_features, in_features, conf)
        qt = self.build(tensors, conf, out_features, in_features, compute_dtype, device)
        for k in keys:  # consumed only once the layer is known good
            state_dict.pop(k)
        return qt

    # ---- saving ----
    def state_dict(self, qt) -> dict[str, torch.Tensor]:
        """Canonical tensors of a loaded weight, keyed by slot key (``weight``, ``weight_scale``, ...)."""
        raise NotImplementedError

    # ---- running ----
    def compute_dtype(self, qt) -> torch.dtype:
        """The dtype of the side tensors (set at load), which the input must be cast to."""
        return qt._params.scale.dtype

    def forward(self, x: torch.Tensor, qt, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ Wᵀ + bias`` for a weight on ``x``'s device in ``x``'s dtype: kitchen's kernels by default;
        a format overrides this to run the project's kernel where ``comfy.quant.kernels`` picks it."""
        return torch.nn.functional.linear(x, qt, bias)

    def share_key(self, qt):
        """Hashable key equal for weights whose activation quantization can be shared, else None."""
        return None

    def grouped_forward(self, x: torch.Tensor, weights, biases):
        """Outputs of several weights with one ``share_key`` on one input (the key is checked by the caller)."""
        raise NotImplementedError

    # ---- LoRA ----
    def describe_delta(self, rank: int | None) -> str:
        """How a delta lands on this format (for reports); ``rank`` None for a non-low-rank adapter."""
        raise NotImplementedError

    def apply_deltas(self, members) -> None:
        """Apply deltas to a share group: ``members`` is a list of ``(module, [LowRankDelta|DenseDelta])``.

        Must only rebind ``module.weight`` to a new Parameter (``layer.as_parameter``), carrying any
        output terms; the patcher keeps the original Parameters and puts them back, so original
        tensors are never written to.
        """
        raise NotImplementedError


def encode_config(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def quantization_header(layers: dict[str, dict]) -> str:
    """The file-level ``_quantization_metadata`` value for ``{layer name: layer JSON}``."""
    return json.dumps({"format_version": "1.0", "layers": layers})


def decode_config(raw, layer: str) -> dict:
    """The layer JSON from a ``comfy_quant`` uint8 tensor (or bytes/str/dict)."""
    try:
        if isinstance(raw, torch.Tensor):
            raw = bytes(raw.to(torch.uint8).flatten().tolist())
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8")
        conf = json.loads(raw) if isinstance(raw, str) else raw
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise QuantizedLayerError(layer, "comfy_quant", "UTF-8 JSON bytes", f"unreadable data ({e})") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise QuantizedLayerError(layer, "comfy_quant", 'a JSON object with a "format" string', repr(conf)[:200])
    return conf

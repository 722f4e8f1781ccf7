"""What every int4 format knows: its tensors, its layer JSON, how to load, save and take a LoRA delta.

A format is a stateless object registered by name (``comfy.quant.formats``). Host code (ops, the
model patcher, the inspector) asks the format instead of branching on format names.

Values checked at load (``QuantFormat.check_values``, run by ``validate``; the inspector and the Nunchaku
converter call the same check). Every float side tensor must be finite: a NaN or Inf in a scale, zero
point, smoothing factor or low-rank factor reaches every output the layer computes. Zero is a per-slot
rule (``TensorSlot.zero``):

* ``ZERO_REFUSED`` (``weight_smooth_factor``): the input is divided by it, so a zero makes Inf/NaN.
* ``ZERO_WARNED`` (``weight_scale``): a zero scale encodes a constant weight group exactly (SVDQuant: all
  zero; AWQ: its zero point) and nothing divides by it, so it is accepted; a load logs one warning per
  layer with the count (rare in a real quantizer's output, so worth a word).
* ``ZERO_ALLOWED`` (``weight_zeros``): an ordinary value.

A non-finite bias is refused as well (``layer.checked_bias``, the same ``check_finite``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from comfy.quant import kitchen, metadata
from comfy.quant.errors import MetadataError, QuantizedLayerError

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ZERO_ALLOWED, ZERO_WARNED, ZERO_REFUSED = "allowed", "warned", "refused"


# The writers whose key spellings load: ``TensorSlot.spellings[i]`` is writer i's name for a slot. 0, the
# canonical one, written on save: comfy-kitchen's own ``state_dict_tensors`` (``weight_`` + its Params field),
# which this package's quantizer and Nunchaku converter write. 1: ComfyUI PR #13580 (``proj_down``,
# ``smooth_factor``, ``weight_zero``). A slot with one spelling is spelled the same by every writer.
SPELLING_WRITERS = ("comfy-kitchen", "ComfyUI PR #13580")


@dataclass(frozen=True)
class TensorSlot:
    """One stored tensor of a quantized layer, as a suffix of ``<layer>.``."""

    key: str                        # canonical key, written on save
    aliases: tuple[str, ...] = ()   # the other writers' spellings (SPELLING_WRITERS[1:]), accepted on load
    packed: bool = False            # int8 packed codes (kept as stored) vs float side tensor (cast)
    zero: str = ZERO_ALLOWED        # float side tensors: is 0 an allowed, warned-about or refused value

    def __post_init__(self):
        if self.zero not in (ZERO_ALLOWED, ZERO_WARNED, ZERO_REFUSED):
            raise ValueError(f"TensorSlot '{self.key}': zero must be one of allowed/warned/refused, got {self.zero!r}")

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)


def is_int(value) -> bool:
    """A JSON integer (``true``/``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf. Fast path: a sum is non-finite whenever an element is (NaN and Inf
    propagate), and on the CPU it costs a small fraction of ``isfinite`` on bf16; a finite tensor whose
    sum overflows gets the exact test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _zero_count(t: torch.Tensor) -> int:
    """How many elements of the finite tensor ``t`` are zero (a one-signed tensor needs no count)."""
    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t)
    if lo > 0 or hi < 0:
        return 0
    return int((t == 0).sum())


def nonfinite_summary(t: torch.Tensor) -> str | None:
    """``"3 NaN, 1 Inf (first at index (2, 5))"`` for a float tensor holding NaN/Inf, else None."""
    if not t.is_floating_point() or t.is_meta or _all_finite(t):
        return None
    bad = ~torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    inf = int(bad.sum()) - nan
    counts = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    return f"{counts} (first at index {tuple(int(i) for i in bad.nonzero()[0])})"


def check_finite(layer: str, tensor: str, t: torch.Tensor) -> None:
    """``QuantizedLayerError`` naming ``layer`` and ``tensor`` when ``t`` holds NaN or Inf."""
    got = nonfinite_summary(t)
    if got is not None:
        raise QuantizedLayerError(layer, tensor, "finite values", got)


def check_slot_values(slot: TensorSlot, layer: str, t: torch.Tensor, name: str | None = None) -> str | None:
    """Apply ``slot``'s value rules to ``t`` (reported as ``name``, default the slot's key): raise
    ``QuantizedLayerError`` on a refused value, return a warning ("<name>: ...") on a value accepted with
    a word, else None. A meta tensor (no values) passes."""
    name = name or slot.key
    if slot.packed or t.is_meta:
        return None
    check_finite(layer, name, t)
    if slot.zero == ZERO_ALLOWED:
        return None
    zeros = _zero_count(t)
    if not zeros:
        return None
    if slot.zero == ZERO_REFUSED:
        first = tuple(int(i) for i in (t == 0).nonzero()[0])
        raise QuantizedLayerError(layer, name, "non-zero values (the layer divides by them)",
                                  f"{zeros} zero(s) (first at index {first})")
    return f"{name}: {zeros} of {t.numel()} values are zero (accepted: the int4 codes of those groups do not count)"


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
        """Every slot's tensor and the file keys they came from; nothing is popped. A slot may be spelled
        by any writer (``SPELLING_WRITERS``), but by one only, and all of a layer's slots by the same one."""
        found, keys, writer = {}, [], None
        for slot in self.slots:
            present = [k for k in slot.spellings if prefix + k in state_dict]
            if not present:
                raise QuantizedLayerError(layer, slot.key, f"a tensor (any of {list(slot.spellings)})", "nothing")
            if len(present) > 1:
                raise QuantizedLayerError(layer, slot.key, "one spelling", f"both {present}")
            if slot.aliases:
                index = slot.spellings.index(present[0])
                if writer is not None and index != writer[0]:
                    raise QuantizedLayerError(
                        layer, present[0], f"'{slot.spellings[writer[0]]}' (the {SPELLING_WRITERS[writer[0]]} "
                        f"spelling of its '{writer[1]}')", f"'{present[0]}' ({SPELLING_WRITERS[index]})")
                writer = writer or (index, present[0])
            found[slot.key] = state_dict[prefix + present[0]]
            keys.append(prefix + present[0])
        self._refuse_foreign(state_dict, prefix, layer)
        return found, keys

    def _refuse_foreign(self, state_dict: dict, prefix: str, layer: str) -> None:
        """A tensor only another int4 format has (``weight_zeros`` beside SVDQuant's tensors) makes no layer."""
        from comfy.quant.formats import FORMATS

        own = {name for slot in self.slots for name in slot.spellings}
        for fmt in FORMATS.values():
            for slot in fmt.slots:
                stray = next((k for k in slot.spellings if k not in own and prefix + k in state_dict), None)
                if stray is not None:
                    raise QuantizedLayerError(layer, stray, f"only {self.name} tensors "
                                              f"({', '.join(s.key for s in self.slots)}, bias)",
                                              f"'{stray}', a tensor of {fmt.name}")

    def expected_shapes(self, out_features: int, in_features: int, conf: dict,
                        tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def input_group_size(self, conf: dict) -> int:
        """Input channels per quantization group; ``in_features`` must be a multiple of it."""
        return conf.get("group_size", self.default_group_size)

    def slot(self, key: str) -> TensorSlot:
        """The slot whose canonical key is ``key``."""
        return next(s for s in self.slots if s.key == key)

    def check_values(self, layer: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Every slot's value rules (module docstring) on the slots present in ``tensors``: raises
        ``QuantizedLayerError`` on the first refused value, returns the warnings ("<slot>: ...") to give."""
        warnings = []
        for slot in self.slots:
            if slot.key in tensors:
                warning = check_slot_values(slot, layer, tensors[slot.key])
                if warning is not None:
                    warnings.append(warning)
        return warnings

    def validate(self, layer: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 conf: dict) -> list[str]:
        """Dtypes, shapes, then values (``check_values``; meta tensors carry none): raises
        ``QuantizedLayerError`` on the first problem, returns the value warnings."""
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
        return self.check_values(layer, tensors)

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
        for warning in self.validate(layer, tensors, out_features, in_features, conf):
            logger.warning("quantized layer '%s': %s", layer, warning)
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


def _tensor_bytes(raw: torch.Tensor, layer: str) -> bytes:
    """A ``comfy_quant`` tensor's bytes; its size is checked before any data is read (it may be meta)."""
    if raw.numel() > metadata.LAYER_JSON_BYTES:
        raise QuantizedLayerError(layer, "comfy_quant", f"at most {metadata.LAYER_JSON_BYTES} bytes of JSON",
                                  f"{raw.numel()} bytes")
    if raw.dtype != torch.uint8:  # a wider integer would be truncated to bytes silently
        raise QuantizedLayerError(layer, "comfy_quant", "a uint8 tensor of UTF-8 JSON bytes", raw.dtype)
    return raw.detach().to("cpu").flatten().numpy().tobytes()


def decode_config(raw, layer: str) -> dict:
    """The layer JSON from a ``comfy_quant`` uint8 tensor (or bytes/str/dict), parsed with the bounds of
    ``comfy.quant.metadata`` (size ``LAYER_JSON_BYTES``, nesting ``MAX_DEPTH``)."""
    try:
        if isinstance(raw, torch.Tensor):
            raw = _tensor_bytes(raw, layer)
        conf = metadata.parse_json(raw, "comfy_quant", layer=layer, max_bytes=metadata.LAYER_JSON_BYTES)
    except MetadataError as e:
        raise QuantizedLayerError(layer, "comfy_quant", e.expected, e.got) from None
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise QuantizedLayerError(layer, "comfy_quant", 'a JSON object with a "format" string', repr(conf)[:200])
    return conf

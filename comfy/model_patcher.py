"""``ModelPatcher``: a model plus the weight patches (LoRAs) to apply to it (mirrors upstream).

Float weights are merged as upstream does (``comfy.lora.calculate_weight``). A quantized weight is
never dequantized or requantized: its format takes the patches as additive deltas
(``QuantFormat.apply_deltas``). Patching only rebinds module attributes; the originals are kept
and put back by ``unpatch_model``, so unpatching is bit-exact.
"""
from __future__ import annotations

import logging
import uuid

import torch

import comfy.lora
from comfy.quant import deltas as int4_deltas
from comfy.quant import formats
from comfy.quant.kitchen import as_parameter
from comfy.quant.layer import tie_shared_quant
from comfy.weight_adapter import WeightAdapterBase

logger = logging.getLogger(__name__)


def _split_key(key):
    module_path, _, param = key.rpartition(".")
    return module_path, param


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.patches = {}
        self.backup = {}
        self.patches_uuid = uuid.uuid4()
        self._applied_uuid = None

    # ---- bookkeeping ----
    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        return n

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        if filter_prefix is not None:
            sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
        return sd

    def get_key_patches(self, filter_prefix=None):
        return {k: v for k, v in self.patches.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def _target(self, key):
        module_path, param = _split_key(key)
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError:
            return None, None
        tensor = getattr(module, param, None)
        return (module, param) if isinstance(tensor, torch.Tensor) else (None, None)

    # ---- patches ----
    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        """Queue patches ``{target: adapter}``; returns the targets accepted. Nothing is applied yet."""
        accepted = []
        for target, adapter in patches.items():
            key, offset, function = (target, None, None) if isinstance(target, str) else (
                target[0], target[1], target[2] if len(target) > 2 else None)
            module, param = self._target(key)
            if module is None:
                continue
            problem = self._patch_problem(module, param, adapter, offset, function, strength_model)
            if problem:
                logger.error("LoRA patch for %s not applied: %s", key, problem)
                continue
            self.patches.setdefault(key, []).append((strength_patch, adapter, strength_model, offset, function))
            accepted.append(target)
        if accepted:
            self.patches_uuid = uuid.uuid4()
        return accepted

    def _patch_problem(self, module, param, adapter, offset, function, strength_model):
        weight = getattr(module, param)
        shape = list(weight.shape)
        if offset is not None:
            dim, start, length = offset
            if dim not in (0, 1) or start < 0 or start + length > shape[dim]:
                return f"offset {offset} outside the weight's shape {tuple(shape)}"
            shape[dim] = length
        if isinstance(adapter, WeightAdapterBase) and not adapter.shape_matches(tuple(shape)):
            return f"adapter delta of shape {adapter.delta_shape()} does not fit the target shape {tuple(shape)}"
        if formats.format_of(weight) is None:
            if not isinstance(adapter, WeightAdapterBase) and adapter[0] in ("diff", "set") and \
                    tuple(adapter[1][0].shape) != tuple(shape):
                return f"'{adapter[0]}' tensor of shape {tuple(adapter[1][0].shape)} does not fit {tuple(shape)}"
            return None
        fmt = formats.format_of(weight).name
        if strength_model != 1.0 or function is not None:
            return f"strength_model/function patches cannot apply to a quantized ({fmt}) weight"
        if isinstance(adapter, WeightAdapterBase):
            if adapter.dora_scale is not None:
                return (f"DoRA rescales the whole weight, which a quantized ({fmt}) weight cannot take "
                        f"without requantizing; load this LoRA on a float model")
            try:  # factor consistency (e.g. up/down ranks) is checked now, not halfway through patch_model
                adapter.low_rank()
            except (ValueError, RuntimeError) as e:
                return f"malformed adapter: {e}"
            return None
        if adapter[0] == "diff":
            if tuple(adapter[1][0].shape) != tuple(shape):
                return f"'diff' tensor of shape {tuple(adapter[1][0].shape)} does not fit {tuple(shape)}"
            return None
        return f"a '{adapter[0]}' patch would replace a quantized ({fmt}) weight; only additive patches apply"

    def _int4_deltas(self, key, weight):
        out = []
        for strength, adapter, _strength_model, offset, _function in self.patches[key]:
            shape = list(weight.shape)
            if offset is not None:
                shape[offset[0]] = offset[2]
            if isinstance(adapter, WeightAdapterBase):
                low = adapter.low_rank()
                if low is not None:
                    up, down, scale = low
                    out.append(int4_deltas.LowRankDelta(up * (strength * scale), down, offset))
                else:
                    out.append(int4_deltas.DenseDelta(adapter.delta_weight(tuple(shape)) * strength, offset))
            else:  # ("diff", (tensor,))
                out.append(int4_deltas.DenseDelta(adapter[1][0].float() * strength, offset))
        return out

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        active = getattr(self.model, "current_patcher", None)
        if active is not None and (active is not self or self._applied_uuid != self.patches_uuid):
            active.unpatch_model()
        if device_to is not None:
            self._move(device_to)
        if getattr(self.model, "current_patcher", None) is not self:
            self.model.current_patcher = self
            try:
                self._apply_patches()
            except Exception:
                self.unpatch_model()  # never leave a model half-patched
                raise
            self._applied_uuid = self.patches_uuid
        return self.model

    def _apply_patches(self):
        quantized = {}  # (format, share key) -> {module: [deltas]}
        for key in self.patches:
            module, param = self._target(key)
            weight = getattr(module, param)
            fmt = formats.format_of(weight)
            if fmt is None:
                self.backup[key] = (module, param, weight)
                merged = comfy.lora.calculate_weight(self.patches[key], weight.detach().to(torch.float32, copy=True), key)
                setattr(module, param, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))
            else:
                group = (fmt, fmt.share_key(weight) or id(module))
                quantized.setdefault(group, {})[module] = self._int4_deltas(key, weight)
        if not quantized:
            return
        siblings = self._share_groups()
        for (fmt, share), members in quantized.items():
            # every sibling sharing the activation quantization takes part (zero-padded) so sharing survives
            for sibling in siblings.get(share, ()):
                members.setdefault(sibling, [])
            for module in members:
                self.backup[("int4", id(module))] = (module, "weight", module.weight,
                                                     module._modules.get("output_deltas"))
            fmt.apply_deltas(list(members.items()))

    def _share_groups(self):
        groups = {}
        for module in self.model.modules():
            fmt = formats.format_of(getattr(module, "weight", None))
            share = fmt.share_key(module.weight) if fmt is not None else None
            if share is not None:
                groups.setdefault(share, []).append(module)
        return groups

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        moved = False
        for entry in reversed(list(self.backup.values())):
            module, param, original = entry[:3]
            current = getattr(module, param)
            if original.device != current.device:  # the model moved while patched
                original = original.to(current.device)
                moved = True
            if formats.format_of(original) is not None:
                module.weight = as_parameter(original)
                if entry[3] is None:
                    module._modules.pop("output_deltas", None)
                else:
                    module.output_deltas = entry[3].to(current.device)
            else:
                setattr(module, param, original if isinstance(original, torch.nn.Parameter)
                        else torch.nn.Parameter(original, requires_grad=False))
        self.backup.clear()
        if moved:
            tie_shared_quant(self.model)  # per-tensor moves copied shared side tensors apart
        if getattr(self.model, "current_patcher", None) is self:
            self.model.current_patcher = None
        self._applied_uuid = None
        if device_to is not None:
            self._move(device_to)

    def _move(self, device):
        self.model.to(device)
        tie_shared_quant(self.model)  # per-tensor moves copy shared side tensors apart; tie them again
        self.model.device = device

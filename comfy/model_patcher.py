"""``ModelPatcher``: a model plus the weight patches (LoRAs) to apply to it (mirrors upstream).

The same shape as upstream's: ``backup[key] = (weight, inplace_update)`` holds each patched key's
original, ``patch_weight_to_device(key)`` patches one key, ``unpatch_model`` puts every original
back. Float weights are merged as upstream does (``comfy.lora.calculate_weight``). An int4 weight is
never dequantized or requantized: ``comfy.quant.host.patch_weight`` lands its patches as deltas
(and patches its q/k/v siblings with it), exactly as the patched upstream ``ModelPatcher`` does.
Patching only rebinds module attributes, so unpatching is bit-exact.
"""
from __future__ import annotations

import logging
import uuid

import torch

import comfy.lora
from comfy.quant import host as int4

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
        """Queue patches ``{target: adapter}``; returns the targets accepted. Nothing is applied yet.

        A patch on an int4 weight is checked now (``comfy.quant.host.patch_problem``, strengths
        included): one that cannot apply is logged with its reason and left out, the rest are queued.
        Patches on float weights are queued unchecked, as upstream queues them."""
        accepted = []
        for target, adapter in patches.items():
            key, offset, function = (target, None, None) if isinstance(target, str) else (
                target[0], target[1], target[2] if len(target) > 2 else None)
            module, param = self._target(key)
            if module is None:
                continue
            weight = getattr(module, param)
            problem = int4.is_int4(weight) and int4.patch_problem(weight, adapter, offset, function, strength_model,
                                                                  strength_patch)
            if problem:
                logger.error("LoRA patch for %s not applied: %s", key, problem)
                continue
            self.patches.setdefault(key, []).append((strength_patch, adapter, strength_model, offset, function))
            accepted.append(target)
        if accepted:
            self.patches_uuid = uuid.uuid4()
        return accepted

    def patch_weight_to_device(self, key, device_to=None):
        module, param = self._target(key)
        weight = getattr(module, param)
        if int4.is_int4(weight):
            int4.patch_weight(self.model, key, self.patches, self.backup, device_to)
            return
        if key not in self.backup:
            self.backup[key] = int4.Backup(weight, False)
        merged = comfy.lora.calculate_weight(self.patches[key], weight.detach().to(torch.float32, copy=True), key)
        setattr(module, param, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        active = getattr(self.model, "current_patcher", None)
        if active is not None and (active is not self or self._applied_uuid != self.patches_uuid):
            active.unpatch_model()
        if device_to is not None:
            self._move(device_to)
        if getattr(self.model, "current_patcher", None) is not self:
            self.model.current_patcher = self
            try:
                for key in self.patches:
                    self.patch_weight_to_device(key, device_to)
            except Exception:
                self.unpatch_model()  # never leave a model half-patched
                raise
            self._applied_uuid = self.patches_uuid
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        for key, bk in reversed(list(self.backup.items())):
            module, param = self._target(key)
            current, original = getattr(module, param), bk.weight
            if original.device != current.device:  # the model moved while patched: follow it
                device = current.device
                original = int4.move_weight(original, lambda t: t.to(device)) if int4.is_int4(original) else \
                    torch.nn.Parameter(original.to(device), requires_grad=False)
            setattr(module, param, original)
        self.backup.clear()
        if getattr(self.model, "current_patcher", None) is self:
            self.model.current_patcher = None
        self._applied_uuid = None
        if device_to is not None:
            self._move(device_to)

    def _move(self, device):
        self.model.to(device)
        self.model.device = device

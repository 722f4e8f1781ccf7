"""LoRA patches on int4 weights, for a host's model patcher: checked up front, applied as deltas.

An int4 weight cannot be dequantized, merged and requantized (kitchen cannot requantize these
layouts, and a 4-bit grid would erase the delta), so a patch lands as a delta the weight's format
takes (``QuantFormat.apply_deltas``). A model patcher calls:

* ``patch_problem(weight, adapter, offset, function, strength_model)`` in ``add_patches``: why a patch
  cannot apply to this int4 weight (report it, do not queue it), or None;
* ``patch_weight(model, key, patches, backup, device_to)`` where it would merge a float weight:
  patches ``key``'s whole share group (q/k/v quantize one activation, so they change together)
  and records each member's original Parameter in ``backup[key] = Backup(weight, False)``;
* ``group_is_patched(model, key, patches)``: whether ``key``'s weight changes when ``patches`` apply
  (its own, or a sibling's in its share group), for loaders that must load such a weight whole.

Restoring is the host's ordinary backup restore: put ``backup[key].weight`` back as is (the same
Parameter object, not re-wrapped). Adapters are read through ``low_rank()``, ``delta_weight(shape)``
and ``dora_scale`` (the weight-adapter delta API); ``("diff", (tensor,))`` patches are dense deltas.
"""
from __future__ import annotations

import collections
import logging

import torch

from comfy.quant import deltas as D
from comfy.quant import formats
from comfy.quant.layer import move_weight

logger = logging.getLogger(__name__)

# the shape of upstream ComfyUI's ModelPatcher.backup entries
Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def _target_shape(weight, offset):
    shape = list(weight.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return tuple(shape)


def patch_problem(weight, adapter, offset=None, function=None, strength_model=1.0) -> str | None:
    """Why ``adapter`` cannot apply to the int4 ``weight`` (a sentence), or None when it can."""
    fmt = formats.format_of(weight).name
    if offset is not None:
        dim, start, length = offset
        if dim not in (0, 1) or start < 0 or length <= 0 or start + length > weight.shape[dim]:
            return f"offset {offset} outside the weight's shape {tuple(weight.shape)}"
    if strength_model != 1.0 or function is not None:
        return f"strength_model/function patches cannot apply to a quantized ({fmt}) weight"
    shape = _target_shape(weight, offset)
    if isinstance(adapter, (tuple, list)):
        if adapter[0] != "diff":
            return f"a '{adapter[0]}' patch would replace a quantized ({fmt}) weight; only additive patches apply"
        got = tuple(adapter[1][0].shape)
        return None if got == shape else f"'diff' tensor of shape {got} does not fit {shape}"
    if getattr(adapter, "dora_scale", None) is not None:
        return (f"DoRA rescales the whole weight, which a quantized ({fmt}) weight cannot take "
                f"without requantizing; load this LoRA on a float model")
    try:  # factor consistency is checked now, never halfway through patching
        low = adapter.low_rank()
        if low is None:
            got = tuple(adapter.delta_weight(shape).shape)
        else:
            up, down, _ = low
            if up.shape[1] != down.shape[0]:
                return f"malformed adapter: up rank {up.shape[1]} != down rank {down.shape[0]}"
            got = (up.shape[0], down.shape[1])
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        return f"malformed adapter: {e}"
    return None if got == shape else f"adapter delta of shape {got} does not fit the target shape {shape}"


def _on_device(adapter, device):
    """``adapter`` with its factor tensors on ``device``, moved in their stored dtype.

    A LoRA file is loaded on the CPU; converting its factors to fp32 there and copying fp32 to the
    GPU costs twice the bytes and a CPU pass per layer (most of a LoRA load on a large model). Both
    hosts' adapters are ``cls(loaded_keys, weights)`` with the tensors in ``weights``; 0-d tensors
    (alpha) stay where they are, so reading them needs no device sync.
    """
    weights = getattr(adapter, "weights", None)
    if device is None or device.type == "cpu" or not isinstance(weights, tuple):
        return adapter
    moving = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.device != device for t in weights]
    if not any(moving):
        return adapter
    moved = tuple(t.to(device, non_blocking=True) if m else t for t, m in zip(weights, moving))
    return type(adapter)(adapter.loaded_keys, moved)


def deltas_of(patch_list, weight) -> list:
    """The ``LowRankDelta`` / ``DenseDelta`` list (fp32, strength applied) for one key's patches,
    computed on ``weight``'s device."""
    out = []
    for strength, adapter, _strength_model, offset, _function in patch_list:
        if isinstance(adapter, (tuple, list)):  # ("diff", (tensor,))
            out.append(D.DenseDelta(adapter[1][0].to(weight.device).float() * strength, offset))
            continue
        adapter = _on_device(adapter, weight.device)
        low = adapter.low_rank()
        if low is not None:
            up, down, scale = low
            out.append(D.LowRankDelta(up.float() * (strength * scale), down.float(), offset))
        else:
            out.append(D.DenseDelta(adapter.delta_weight(_target_shape(weight, offset)).float() * strength, offset))
    return out


def _module_and_name(model, key):
    path, _, param = key.rpartition(".")
    return model.get_submodule(path), path, param


def _base(backup, key, module):
    bk = backup.get(key)
    return module.weight if bk is None else bk.weight


def share_group(model, key, backup=None) -> list[tuple[str, torch.nn.Module]]:
    """``[(weight key, module)]`` of the int4 linears that share ``key``'s activation quantization
    (its siblings with an equal ``share_key`` on their original weights), ``key`` first."""
    backup = backup or {}
    module, path, _ = _module_and_name(model, key)
    base = _base(backup, key, module)
    fmt = formats.format_of(base)
    share = fmt.share_key(base)
    group = [(key, module)]
    if share is None or "." not in path:
        return group
    parent_path = path.rpartition(".")[0]
    for name, child in model.get_submodule(parent_path).named_children():
        child_key = f"{parent_path}.{name}.weight"
        if child is module or formats.format_of(getattr(child, "weight", None)) is not fmt:
            continue
        if fmt.share_key(_base(backup, child_key, child)) == share:
            group.append((child_key, child))
    return group


def group_is_patched(model, key, patches) -> bool:
    return any(k in patches for k, _ in share_group(model, key))


def is_patched(weight) -> bool:
    """Whether ``weight`` is a Parameter that ``patch_weight`` made (a LoRA is applied to it)."""
    return getattr(weight, "int4_base", None) is not None


def patch_weight(model, key, patches, backup, device_to=None) -> None:
    """Apply the patches of ``key``'s share group to its int4 weights (on ``device_to`` when given).

    Each member is rebuilt from its original (``backup`` entry, else the current weight), so applying
    twice gives the same result; every member's original goes into ``backup``. Nothing is written to
    an original tensor. When the group is already patched only the device is brought in line.
    """
    module = _module_and_name(model, key)[0]
    if is_patched(module.weight):
        if device_to is not None and module.weight.device != torch.device(device_to):
            for _, m in share_group(model, key, backup):
                m.weight = move_weight(m.weight, lambda t: t.to(device_to))
        return
    group = share_group(model, key, backup)
    bases = {k: _base(backup, k, m) for k, m in group}
    fmt = formats.format_of(bases[key])
    fn = None if device_to is None else (lambda t: t.to(device_to))
    members = []
    for k, m in group:
        base = bases[k]
        m.weight = base if fn is None else move_weight(base, fn)
        members.append((m, deltas_of(patches.get(k, ()), m.weight)))
    try:
        fmt.apply_deltas(members)
    except Exception:
        for k, m in group:
            m.weight = bases[k]
        raise
    for k, m in group:
        backup.setdefault(k, Backup(bases[k], False))
        m.weight.int4_base = bases[k]

"""``lora-check``: which LoRA keys map to which layers of a model, and how each would apply.

Uses only what upstream ComfyUI and this repository's host both have: ``comfy.lora.model_lora_keys_unet``,
``comfy.lora.load_lora``, ``ModelPatcher.clone`` / ``add_patches``, and (upstream) ``comfy.lora_convert``.
"""
from __future__ import annotations

import importlib

from comfy.quant import formats


def how_applied(weight, adapter) -> str:
    fmt = formats.format_of(weight)
    if fmt is None:
        return "merged into float weight"
    low = adapter.low_rank() if hasattr(adapter, "low_rank") else None
    return fmt.describe_delta(None if low is None else low[1].shape[0])


def _convert(lora_sd):
    try:  # upstream normalises some trainers' key spellings before mapping
        return importlib.import_module("comfy.lora_convert").convert_lora(lora_sd)
    except ImportError:
        return lora_sd


def _weight(model, key):
    path, _, param = key.rpartition(".")
    return getattr(model.get_submodule(path), param, None)


def lora_check(patcher, lora_sd) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(rows of (LoRA key prefix, target, how), LoRA keys that did not map) for ``patcher``'s model."""
    import comfy.lora

    lora_sd = _convert(lora_sd)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    target_to_prefix = {}
    for prefix, target in key_map.items():
        target_to_prefix.setdefault(target, []).append(prefix)
    rows, used = [], set()
    probe = patcher.clone()
    probe.patches = {}
    for target, adapter in loaded.items():
        key = target if isinstance(target, str) else target[0]
        prefixes = [p for p in target_to_prefix.get(target, []) if any(k.startswith(p + ".") for k in lora_sd)]
        used.update(k for k in lora_sd for p in prefixes if k.startswith(p + "."))
        if not probe.add_patches({target: adapter}):
            how = "REJECTED (see log)"
        else:
            how = how_applied(_weight(patcher.model, key) if key.endswith(".weight") else None, adapter)
        shown = key if isinstance(target, str) else f"{key} rows {target[1]}"
        rows.append((prefixes[0] if prefixes else "?", shown, how))
    unmapped = sorted(k for k in lora_sd if k not in used)
    return sorted(rows, key=lambda r: r[1]), unmapped

"""``lora-check``: which LoRA keys map to which layers of a model, and how each would apply.

Uses only what upstream ComfyUI and this repository's host both have: ``comfy.lora.model_lora_keys_unet``,
``comfy.lora.load_lora`` (its ``refused`` report where the host's has one), ``comfy.quant.host.patch_problem``
(the check ``add_patches`` runs) and, upstream, ``comfy.lora_convert``.

A row's ``how`` starts with ``REJECTED`` when the patch would be refused (``REJECTED: <reason>``);
``has_problems(rows, unmapped)`` says whether any row is rejected or any key did not map.
"""
from __future__ import annotations

import importlib
import inspect

from comfy.quant import formats
from comfy.quant.patching import patch_problem

REJECTED = "REJECTED"


def how_applied(weight, adapter) -> str:
    fmt = formats.format_of(weight)
    if fmt is None:
        return "merged into float weight"
    low = adapter.low_rank() if hasattr(adapter, "low_rank") else None
    return fmt.describe_delta(None if low is None else low[1].shape[0])


def is_rejected(how: str) -> bool:
    return how.startswith(REJECTED)


def has_problems(rows, unmapped) -> bool:
    """Whether a ``lora_check`` result holds a rejected patch or a key that did not map (a CLI exits non-zero)."""
    return bool(unmapped) or any(is_rejected(how) for _, _, how in rows)


def _convert(lora_sd):
    try:  # upstream normalises some trainers' key spellings before mapping
        return importlib.import_module("comfy.lora_convert").convert_lora(lora_sd)
    except ImportError:
        return lora_sd


def _weight(model, key):
    path, _, param = key.rpartition(".")
    return getattr(model.get_submodule(path), param, None)


def _load(lora_sd, key_map):
    """``(loaded, refused, not_loaded)``: the host's ``load_lora`` result, the patches it left out and the keys
    it did not load (the last two where the host's ``load_lora`` reports them; else ``[]`` and None)."""
    import comfy.lora

    if "refused" not in inspect.signature(comfy.lora.load_lora).parameters:
        return comfy.lora.load_lora(lora_sd, key_map, log_missing=False), [], None
    refused, not_loaded = [], []
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False, not_loaded=not_loaded, refused=refused)
    return loaded, refused, not_loaded


def _weight_target(target):
    """The weight target beside a bias target (LoRA prefixes name the module, mapped to its weight)."""
    key = target if isinstance(target, str) else target[0]
    if not key.endswith(".bias"):
        return target
    weight = key[:-len(".bias")] + ".weight"
    return weight if isinstance(target, str) else (weight, *target[1:])


def _shown(target) -> str:
    return target if isinstance(target, str) else f"{target[0]} rows {target[1]}"


def _how(model, target, adapter) -> str:
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    weight = _weight(model, key)
    problem = patch_problem(weight, adapter, offset)
    if problem:
        return f"{REJECTED}: {problem}"
    return how_applied(weight if key.endswith(".weight") else None, adapter)


def lora_check(patcher, lora_sd) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(rows of (LoRA key prefix, target, how), LoRA keys that did not map) for ``patcher``'s model.

    A patch the host would refuse (malformed, non-finite, a duplicate spelling of a module, a shape
    that does not fit, ...) is a row whose ``how`` is ``REJECTED: <reason>``."""
    import comfy.lora

    lora_sd = _convert(lora_sd)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    loaded, refused, not_loaded = _load(lora_sd, key_map)
    target_to_prefix = {}
    for prefix, target in key_map.items():
        target_to_prefix.setdefault(target, []).append(prefix)
    losers = {(r.prefix, r.target) for r in refused}
    rows = [(r.prefix, _shown(r.target), f"{REJECTED}: {r.reason}") for r in refused]
    rejected_keys = {k for r in refused for k in r.keys}
    used = set(rejected_keys)
    for target, adapter in loaded.items():
        candidates = target_to_prefix.get(target, []) + target_to_prefix.get(_weight_target(target), [])
        prefixes = [p for p in candidates if (p, target) not in losers and any(k.startswith(p + ".") for k in lora_sd)]
        used.update(k for k in lora_sd for p in prefixes if k.startswith(p + "."))
        rows.append((prefixes[0] if prefixes else "?", _shown(target), _how(patcher.model, target, adapter)))
    if not_loaded is not None:  # the host says exactly which keys it did not load
        unmapped = sorted(set(not_loaded) - rejected_keys)
    else:
        unmapped = sorted(k for k in lora_sd if k not in used)
    return sorted(rows, key=lambda r: r[1]), unmapped

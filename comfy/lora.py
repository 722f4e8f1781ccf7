"""LoRA key mapping, loading and dense merging (mirrors upstream ``comfy/lora.py``).

* ``model_lora_keys_unet(model, key_map)`` maps every LoRA key prefix a user's file may carry to
  the model weight key it patches, ``"diffusion_model.<X>.weight"``, or, for a part of a fused
  weight, to ``(weight_key, (dim, start, length))``.
* ``load_lora(lora, to_load)`` turns a LoRA state dict into ``{target: adapter or ("diff", ...)}``,
  leaving out (and reporting) malformed modules and second spellings of a module; never raises.
* ``calculate_weight(patches, weight, key)`` merges patches into a dense weight.

int4 weights are never merged here: the model patcher hands int4 targets the adapter's
``low_rank()`` / ``delta_weight()`` instead (see ``comfy/weight_adapter/base.py``).
"""
from __future__ import annotations

import collections
import logging

import torch

from . import weight_adapter
from .quant.patching import adapter_problem
from .weight_adapter.base import cast_to_device, pad_tensor_to_shape

logger = logging.getLogger(__name__)

DIFFUSION_PREFIX = "diffusion_model."


# ------------------------------------------------------------------------------------ key map
def lora_prefix_variants(path: str) -> list:
    """Every LoRA key prefix under which module path ``path`` (e.g. ``transformer_blocks.0.attn.to_q``)
    appears in the LoRA files users bring."""
    flat = path.replace(".", "_")
    return [
        path,  # diffusers without prefix / Qwen-Image LoRA format
        "transformer.{}".format(path),  # diffusers
        "diffusion_model.{}".format(path),  # ComfyUI / musubi (generic upstream format)
        "lora_unet_{}".format(flat),  # kohya
        "lycoris_{}".format(flat),  # LyCORIS (SimpleTuner)
    ]


def add_fused_targets(key_map: dict, fused_weight_key: str, parts) -> dict:
    """Map LoRA prefixes onto a slice of a fused weight.

    ``parts`` is a list of ``(prefix_variant, ..., dim, start, length)``: all entries but the last three
    are LoRA key prefixes (strings, or lists/tuples of strings), each mapped to
    ``(fused_weight_key, (dim, start, length))``, i.e. rows ``start:start+length`` of dim ``dim``.
    """
    for part in parts:
        if len(part) < 4:
            raise ValueError("fused part {!r} needs prefixes and (dim, start, length)".format(part))
        *prefixes, dim, start, length = part
        target = (fused_weight_key, (int(dim), int(start), int(length)))
        for p in prefixes:
            if isinstance(p, str):
                key_map[p] = target
            else:
                for q in p:
                    key_map[q] = target
    return key_map


def _resolve_part_path(fused_path: str, part_name: str) -> str:
    """Full module path of a virtual part: ``part_name`` may be a full path
    (``transformer_blocks.0.attn.to_q``), relative to a parent of the fused module (``attn.to_q``)
    or a sibling name (``to_q``)."""
    parent = fused_path.split(".")[:-1]
    part = part_name.split(".")
    for j in range(len(parent) + 1):  # largest overlap of parent's tail with the part's head first
        tail = parent[j:]
        if part[:len(tail)] == tail and len(part) > len(tail):
            return ".".join(parent[:j] + part)
    return ".".join(parent + part)


def _is_dense_weight(w) -> bool:
    return type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_floating_point()


def _weight_module_paths(diffusion_model: torch.nn.Module):
    """(module paths owning a weight, other state-dict keys to map to themselves), both without the
    ``diffusion_model.`` prefix. Other keys are biases and float tensors of modules whose weight is
    dense; the extra tensors of a quantized layer (scales, smoothing, ...) are never LoRA targets."""
    quantized = set()
    module_weight_paths = []
    for name, module in diffusion_model.named_modules():
        w = getattr(module, "weight", None)
        if torch.is_tensor(w):
            module_weight_paths.append(name)
            if not _is_dense_weight(w):
                quantized.add(name)
        elif hasattr(module, "comfy_quant") or hasattr(module, "quant_format"):
            quantized.add(name)
    try:
        sd = diffusion_model.state_dict()
    except Exception as e:  # a layer that cannot write its state yet; fall back to the modules
        logger.debug("state_dict() failed while building the LoRA key map: %s", e)
        sd = {}
    weight_paths = []
    other_keys = []
    seen = set()
    for k, v in sd.items():
        if k.endswith(".weight"):
            p = k[:-len(".weight")]
            if p not in seen:
                seen.add(p)
                weight_paths.append(p)
            continue
        owner = k.rsplit(".", 1)[0] if "." in k else ""
        if k.endswith(".bias") or (owner not in quantized and torch.is_tensor(v) and v.is_floating_point()):
            other_keys.append(k)
    for name in module_weight_paths:
        if name and name not in seen:
            seen.add(name)
            weight_paths.append(name)
    return weight_paths, other_keys


def model_lora_keys_unet(model, key_map=None):
    """``{LoRA key prefix: "diffusion_model.<X>.weight" or (weight key, (dim, start, length))}``.

    ``model`` is the wrapper whose ``.diffusion_model`` is the transformer. Every module path X
    owning a ``weight`` is reachable as ``X``, ``transformer.X``, ``diffusion_model.X``,
    ``lora_unet_<X_>`` and ``lycoris_<X_>``; other float state-dict keys
    (biases, ...) map ``diffusion_model.<key>`` to themselves (upstream's generic format).
    When the transformer has ``lora_fused_targets`` (``{fused module path: [(part name, dim,
    start, length), ...]}``) the parts' prefixes map onto slices of the fused weight.
    """
    if key_map is None:
        key_map = {}
    dm = model.diffusion_model
    weight_paths, other_keys = _weight_module_paths(dm)
    for path in weight_paths:
        target = "{}{}.weight".format(DIFFUSION_PREFIX, path)
        for prefix in lora_prefix_variants(path):
            key_map[prefix] = target
    for k in other_keys:
        full = DIFFUSION_PREFIX + k
        key_map[full] = full

    fused = getattr(dm, "lora_fused_targets", None) or {}
    for fused_path, parts in fused.items():
        if fused_path.endswith(".weight"):
            fused_path = fused_path[:-len(".weight")]
        if fused_path.startswith(DIFFUSION_PREFIX):
            fused_path = fused_path[len(DIFFUSION_PREFIX):]
        fused_key = "{}{}.weight".format(DIFFUSION_PREFIX, fused_path)
        rows = []
        for part_name, dim, start, length in parts:
            part_path = _resolve_part_path(fused_path, part_name)
            rows.append((lora_prefix_variants(part_path), dim, start, length))
        add_fused_targets(key_map, fused_key, rows)
    return key_map


# --------------------------------------------------------------------------------- load_lora
def _bias_target(target):
    """The bias target next to a weight target (keeps the offset for a dim-0 slice)."""
    if isinstance(target, tuple):
        key, offset = target[0], target[1]
        if not key.endswith(".weight") or offset[0] != 0:
            return None
        return ("{}.bias".format(key[:-len(".weight")]), offset) + tuple(target[2:])
    if not target.endswith(".weight"):
        return None
    return "{}.bias".format(target[:-len(".weight")])


# one patch a LoRA prefix yields, and one it cannot: ``keys`` are the LoRA keys behind it
_Entry = collections.namedtuple("_Entry", ["prefix", "target", "patch", "keys"])
Refused = collections.namedtuple("Refused", ["prefix", "target", "keys", "reason"])


def _alpha(lora, x):
    """``(alpha, problem)`` of LoRA prefix ``x``: a float or None, and why it is not a scalar."""
    a = lora.get("{}.alpha".format(x))
    if a is None:
        return None, None
    if torch.is_tensor(a):
        if a.numel() != 1:
            return None, "alpha has shape {}, expected a scalar (0-d or 1 element)".format(tuple(a.shape))
        a = a.item()
    try:
        return float(a), None
    except (TypeError, ValueError):
        return None, "alpha {!r} is not a number".format(a)


def _adapter_entry(lora, x, target):
    """The weight-adapter entry of prefix ``x`` (alpha and dora_scale keys included), or None."""
    alpha, problem = _alpha(lora, x)
    dora_name = "{}.dora_scale".format(x)
    for adapter_cls in weight_adapter.adapters:
        adapter = adapter_cls.load(x, lora, alpha, lora.get(dora_name), set())
        if adapter is not None:
            extra = {n for n in ("{}.alpha".format(x), dora_name) if n in lora}
            return _Entry(x, target, adapter, frozenset(adapter.loaded_keys | extra)), problem
    return None, None


def _dense_entries(lora, x, target):
    """Entries of prefix ``x``'s dense patches: ``w_norm``/``b_norm``, ``diff``, ``diff_b``, ``set_weight``."""
    bias = _bias_target(target)
    wanted = [("w_norm", target, "diff"), ("diff", target, "diff"), ("diff_b", bias, "diff"),
              ("set_weight", target, "set")]
    if "{}.w_norm".format(x) in lora:
        wanted.insert(1, ("b_norm", bias, "diff"))
    out = []
    for suffix, tgt, kind in wanted:
        name = "{}.{}".format(x, suffix)
        if name in lora and tgt is not None:
            out.append(_Entry(x, tgt, (kind, (lora[name],)), frozenset([name])))
    return out


def _prefix_entries(lora, x, target):
    """``(entries, refused)`` of LoRA prefix ``x``: each patch checked for shape and alpha (no value scan)."""
    entry, alpha_problem = _adapter_entry(lora, x, target)
    dense = _dense_entries(lora, x, target)
    if entry is None and dense and "{}.alpha".format(x) in lora:  # alpha counts as loaded with the rest
        dense[0] = dense[0]._replace(keys=dense[0].keys | {"{}.alpha".format(x)})
    entries, refused = [], []
    for e in ([entry] if entry is not None else []) + dense:
        problem = (alpha_problem if e is entry else None) or adapter_problem(e.patch, scan_values=False)
        if problem:
            refused.append(Refused(x, e.target, sorted(e.keys), problem))
        else:
            entries.append(e)
    return entries, refused


def _first_per_target(entries, lora):
    """``(kept, duplicates)``: of the entries patching one target, the one whose keys come first in the
    file is kept (in ``entries``' order); the others are refused as duplicates of it."""
    order = {k: i for i, k in enumerate(lora)}
    first = {}
    for e in sorted(entries, key=lambda e: min(order[k] for k in e.keys)):
        first.setdefault(e.target, e)
    kept, duplicates = [], []
    for e in entries:
        if first[e.target] is e:
            kept.append(e)
        else:
            why = "duplicate of '{}', which comes first in the file".format(first[e.target].prefix)
            duplicates.append(Refused(e.prefix, e.target, sorted(e.keys), why))
    return kept, duplicates


def _shown(target):
    return target if isinstance(target, str) else "{} rows {}".format(target[0], target[1])


def load_lora(lora, to_load, log_missing=True, not_loaded=None, refused=None):
    """``{target: adapter | ("diff", (tensor,)) | ("set", (tensor,))}`` for the prefixes in ``to_load``.

    Never raises on a malformed entry: a patch whose alpha is not a scalar or whose factors do not
    compose (``adapter_problem`` without the value scan, which ``add_patches`` runs) is left out, and
    of several patches for one target (one module under two spellings) the first in the file is kept.
    Every LoRA key not loaded is logged (``lora key not loaded: KEY (reason)``) when ``log_missing``
    and appended to ``not_loaded`` when a list is given; ``refused`` (a list) receives a ``Refused``
    ``(prefix, target, keys, reason)`` per patch left out.
    """
    entries, left_out = [], []
    for x, target in to_load.items():
        found, bad = _prefix_entries(lora, x, target)
        entries += found
        left_out += bad
    kept, duplicates = _first_per_target(entries, lora)
    left_out += duplicates
    loaded_keys = set().union(*(e.keys for e in kept))
    reasons = {k: "{}: {}".format(_shown(r.target), r.reason) for r in reversed(left_out) for k in r.keys}
    for k in lora.keys():
        if k not in loaded_keys:
            if log_missing:
                why = reasons.get(k)
                logger.warning("lora key not loaded: {}{}".format(k, " ({})".format(why) if why else ""))
            if not_loaded is not None:
                not_loaded.append(k)
    if refused is not None:
        refused.extend(left_out)
    return {e.target: e.patch for e in kept}


# --------------------------------------------------------------------------- calculate_weight
def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    """Merge ``patches`` (``[(strength_patch, adapter or tuple, strength_model, offset, function)]``)
    into the dense ``weight`` in place and return it. An offset ``(dim, start, length)`` narrows the
    weight to the slice the patch targets; a patch that does not fit is logged and skipped."""
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is None:
            function = lambda a: a  # noqa: E731

        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])

        if strength_model != 1.0:
            weight *= strength_model

        if isinstance(v, list):
            # [(base tensor, convert_func), patches...]: a weight computed from its own patch list
            base = cast_to_device(v[0][0], weight.device, intermediate_dtype, copy=True)
            v = (calculate_weight(v[1:], v[0][1](base, inplace=True), key,
                                  intermediate_dtype=intermediate_dtype),)

        if isinstance(v, weight_adapter.WeightAdapterBase):
            output = v.calculate_weight(weight, key, strength, strength_model, offset, function,
                                        intermediate_dtype, original_weights)
            if output is None:
                logger.warning("Calculate Weight Failed: {} {}".format(v.name, key))
            elif old_weight is None:
                weight = output
            if old_weight is not None:
                weight = old_weight
            continue

        if len(v) == 1:
            patch_type = "diff"
        elif len(v) == 2:
            patch_type, v = v[0], v[1]
        else:
            patch_type = None

        if patch_type == "diff":
            diff = v[0]
            do_pad_weight = len(v) > 1 and v[1].get("pad_weight", False)
            if do_pad_weight and tuple(diff.shape) != tuple(weight.shape) and old_weight is None:
                logger.info("Pad weight {} from {} to shape: {}".format(key, tuple(weight.shape), tuple(diff.shape)))
                weight = pad_tensor_to_shape(weight, diff.shape)
            if strength != 0.0:
                if tuple(diff.shape) != tuple(weight.shape):
                    logger.error("ERROR diff {}: shape mismatch, expected {} got {}; WEIGHT NOT MERGED".format(
                        key, tuple(weight.shape), tuple(diff.shape)))
                else:
                    weight += function(strength * cast_to_device(diff, weight.device, weight.dtype))
        elif patch_type == "set":
            src = v[0]
            if tuple(src.shape) != tuple(weight.shape):
                logger.error("ERROR set {}: shape mismatch, expected {} got {}; WEIGHT NOT SET".format(
                    key, tuple(weight.shape), tuple(src.shape)))
            else:
                weight.copy_(cast_to_device(src, weight.device, weight.dtype))
        elif patch_type == "model_as_lora":
            target_weight = v[0]
            diff_weight = cast_to_device(target_weight, weight.device, intermediate_dtype) - \
                cast_to_device(original_weights[key][0][0], weight.device, intermediate_dtype)
            weight += function(strength * cast_to_device(diff_weight, weight.device, weight.dtype))
        else:
            logger.warning("patch type not recognized {} {}".format(patch_type, key))

        if old_weight is not None:
            weight = old_weight

    return weight

"""The interface a ComfyUI host calls for int4 layers: the whole of it, in one place.

Upstream ComfyUI (through the shipped patch, ``comfy/quant_tools/upstream/comfyui.patch``) and this
repository's embedded host call these functions the same way and rely on nothing else of this
package. Every one of them leaves a host's non-int4 behaviour alone: it acts only on an int4 weight,
an int4 ``comfy_quant`` entry or a file that names or holds int4 layers, and otherwise returns what the
host would have used (False, None, its own input). The upstream patch calls ``load_linear``,
``save_linear``, ``is_int4``, ``linear_forward``, ``move_weight``, ``run_linear_group``,
``tie_shared_quant``, ``prepare_state_dict``, ``load_state_dict``, ``saveable``, ``QuantFileError``,
``patch_problem`` (on int4 weights only), ``patch_weight`` and ``group_is_patched``; the rest serve the
embedded host and the tools. A host's linear module needs ``weight``, ``bias``, ``in_features``,
``out_features`` and ``factory_kwargs = {"device": ..., "dtype": compute dtype}``.

Mixed-precision ``Linear``
    ``load_linear(module, state_dict, prefix, missing_keys) -> bool``   in ``_load_from_state_dict``
    ``checked_bias(module, bias, layer)``                              the same bias checks for float layers
    ``save_linear(module, destination, prefix) -> bool``                in ``state_dict``
    ``is_int4(weight)``, ``linear_forward(module, input, weight, bias)`` in the forward
    ``move_weight(param, fn)``                                         in ``_apply`` (keeps ties)
    ``as_parameter(tensor)``                                           wrap without cloning side tensors
Models
    ``run_linear_group(input, modules)``   sibling projections on one input (q/k/v)
    ``tie_shared_quant(model)``            after loading weights
    ``quant_algos()``, ``layout_class(name)`` for ``quant_ops.QUANT_ALGOS`` and its layout registry
Files
    ``prepare_state_dict(sd, metadata)``   Nunchaku checkpoints become native int4 tensors; the file's
                                           quantization metadata is checked before a model is built
    ``load_state_dict(model, sd, strict, assign)``  in place of ``model.load_state_dict``: a file with
                                           int4 layers loads whole or raises (``comfy.quant.loading``)
    ``saveable(sd)``                       shared tensors (tied q/k/v) cloned, as safetensors requires
    ``raise_if_unreadable(path, error)``   in ``load_torch_file``'s handler: a corrupt, truncated or missing
                                           file, or a directory, becomes ``UnreadableFileError`` naming it
Errors
    ``QuantFileError``                     the base of every input error above (a ``ValueError``);
                                           ``e.with_file(path)`` names the file and returns ``e``
Model patcher (LoRA)
    ``patch_problem``, ``patch_weight``, ``group_is_patched``, ``Backup``   see ``comfy.quant.patching``
    ``adapter_problem``, ``strength_problem``, ``check_strength``          LoRA checks before anything is patched
    ``lora_alpha(tensor)``                 a file's alpha for an adapter (a non-scalar is refused, not raised)
"""
from __future__ import annotations

import logging

from comfy.quant import formats, kitchen, nunchaku
from comfy.quant.deltas import as_parameter, output_terms
from comfy.quant.errors import QuantFileError
from comfy.quant.layer import (checked_bias, is_int4, linear_forward, load_linear, move_weight, run_linear_group,
                               save_linear, tie_shared_quant, warn_unsaved_terms)
from comfy.quant.loading import check_state_dict, involves_int4, load_state_dict, names_int4
from comfy.quant.patching import (Backup, adapter_problem, check_strength, group_is_patched, lora_alpha,
                                  patch_problem, patch_weight, strength_problem)
from comfy.quant.files import raise_if_unreadable

logger = logging.getLogger(__name__)


def quant_algos() -> dict[str, dict]:
    """``QUANT_ALGOS`` entries of the int4 formats this kitchen build can run."""
    return {name: fmt.algo_entry() for name, fmt in formats.FORMATS.items() if fmt.available}


def layout_class(name: str):
    """The kitchen layout class of int4 format ``name``."""
    return kitchen.layout_class(formats.get_format(name).layout)


def prepare_state_dict(sd: dict, metadata: dict | None):
    """``(sd, metadata)`` ready for a ComfyUI loader: a Nunchaku checkpoint is converted in memory, and
    the quantization metadata is checked (``comfy.quant.loading.check_state_dict``)."""
    if nunchaku.is_nunchaku_checkpoint(sd.keys(), metadata or {}):
        logger.info("Nunchaku checkpoint: converting to ComfyUI-native int4 while loading")
        sd, metadata = nunchaku.convert_nunchaku_state_dict(sd, dict(metadata or {}))
    if involves_int4(sd, metadata):  # any other file goes to the host exactly as it came
        check_state_dict(sd, metadata)
    return sd, metadata


def saveable(sd: dict) -> dict:
    """``sd`` with every tensor that shares memory with an earlier one cloned, when ``sd`` holds int4 layers:
    safetensors refuses shared tensors, and tied q/k/v side tensors are shared on purpose. Any other ``sd``
    is returned as is (safetensors judges it as before). The tensors of ``sd`` are not changed. Warns when
    int4 layers are saved without their LoRA output terms (``layer.warn_unsaved_terms``)."""
    if not any(k.endswith(".comfy_quant") and names_int4(v) for k, v in sd.items()):
        return sd
    warn_unsaved_terms(sd)
    seen, out = set(), {}
    for key, t in sd.items():
        ptr = (t.untyped_storage().data_ptr(), t.data_ptr()) if t.numel() else None
        out[key] = t.clone() if ptr is not None and ptr in seen else t
        seen.add(ptr)
    return out


__all__ = ["Backup", "QuantFileError", "adapter_problem", "as_parameter", "check_strength", "checked_bias",
           "group_is_patched", "is_int4", "layout_class", "linear_forward", "load_linear", "load_state_dict",
           "lora_alpha", "move_weight", "output_terms", "patch_problem", "patch_weight", "prepare_state_dict",
           "quant_algos", "raise_if_unreadable", "run_linear_group", "save_linear", "saveable", "strength_problem",
           "tie_shared_quant"]

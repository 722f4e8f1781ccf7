"""Loading entry points (mirrors upstream ``comfy/sd.py``: diffusion-model loading and LoRA loading)."""
from __future__ import annotations

import logging

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils
from comfy.quant import host as int4
from comfy.quant.errors import QuantFileError

logger = logging.getLogger(__name__)


def load_diffusion_model_state_dict(sd, model_options={}, metadata=None):
    """Build the model a state dict describes and load it → ``ModelPatcher`` (``sd`` is consumed)."""
    sd, metadata = int4.prepare_state_dict(sd, metadata)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) if prefix else sd
    sd, metadata = comfy.utils.convert_old_quants(sd, metadata=metadata)

    model_config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata)
    if model_config is None:
        raise QuantFileError(f"not a supported diffusion model (this build loads Qwen-Image): no 'txt_norm.weight'; "
                             f"first keys: {list(sd)[:8]}", expected="a Qwen-Image diffusion model")
    model_config.quant_config = comfy.utils.detect_layer_quantization(sd, "")

    load_device = model_options.get("load_device", comfy.model_management.get_torch_device())
    offload_device = comfy.model_management.unet_offload_device()
    dtype = model_options.get("dtype") or comfy.model_management.unet_dtype(load_device)
    model_config.set_inference_dtype(dtype, None)

    model = model_config.get_model(sd, "", device=offload_device)
    model.load_model_weights(sd, "")
    if sd:
        logger.info("left over keys in diffusion model: %s", list(sd))
    if model_config.quant_config is not None:
        tied = int4.tie_shared_quant(model.diffusion_model)
        logger.info("int4 layers: %d groups share their activation quantization", tied)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_diffusion_model(unet_path, model_options={}):
    sd, metadata = comfy.utils.load_torch_file(unet_path, return_metadata=True)
    try:
        return load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata)
    except QuantFileError as e:  # the same error, now naming the file
        raise e.with_file(unet_path)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    """Apply a LoRA state dict to a model (text encoder not carried here) → ``(model, clip)``.

    Patches an int4 weight cannot take (a strength that is not a finite number within ±100
    included) are refused one by one (logged, and ``NOT LOADED``) and the rest applies; a LoRA of
    which nothing applies is a warning, not an error."""
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    not_loaded, refused = [], []
    loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded, refused=refused)
    new_modelpatcher = None
    if model is not None:
        new_modelpatcher = model.clone()
        accepted = set(new_modelpatcher.add_patches(loaded, strength_model))
        for target in loaded:
            if target not in accepted:
                logger.warning("NOT LOADED %s", target)
        if not accepted:  # an empty LoRA, one for another model, or one whose every patch is refused
            logger.warning("LoRA: nothing applies to this model: %s", "it has no keys" if not lora else
                           f"of its {len(lora)} keys, {len(not_loaded)} did not load ({len(refused)} patches "
                           f"refused, the rest map to no layer) and {len(loaded)} patches were refused")
    if clip is not None and strength_clip:
        logger.warning("text-encoder LoRA keys are not applied: this build carries no text encoder")
    return new_modelpatcher, clip

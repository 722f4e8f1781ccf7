"""Recognise an architecture and its dimensions from a state dict (mirrors upstream ``comfy/model_detection.py``).

Only unquantized tensors are measured: a packed int4 weight has half its logical width.
"""
import json
import logging
import re

from comfy import supported_models

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def unet_prefix_from_state_dict(state_dict):
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "model."):
        if any(k.startswith(prefix) for k in state_dict):
            return prefix
    return ""


def default_axes_dims_rope(head_dim):
    """(t, h, w) RoPE widths; the real model's (16, 56, 56) at head dim 128, the same proportions otherwise."""
    t = head_dim // 8
    if t % 2 or (head_dim - t) % 4:
        raise ValueError(f"cannot split head dim {head_dim} into RoPE axes; give axes_dims_rope in the file's config")
    return (t, (head_dim - t) // 2, (head_dim - t) // 2)


def detect_unet_config(state_dict, key_prefix, metadata=None):
    if f"{key_prefix}txt_norm.weight" not in state_dict:
        return None
    def shape(name):
        key = f"{key_prefix}{name}"
        if key not in state_dict:
            raise ValueError(f"Qwen-Image checkpoint: tensor '{key}' expected (unquantized), not found")
        return state_dict[key].shape

    inner_dim, in_channels = shape("img_in.weight")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if inner_dim % head_dim:
        raise ValueError(f"Qwen-Image checkpoint: inner dim {inner_dim} is not a multiple of head dim {head_dim}")
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k[len(key_prefix):]))}
    config = {
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0] // 4,
        "num_layers": len(blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner_dim // head_dim,
        "joint_attention_dim": shape("txt_norm.weight")[0],
    }
    file_config = json.loads((metadata or {}).get("config", "{}") or "{}")
    axes = file_config.get("axes_dims_rope")
    config["axes_dims_rope"] = tuple(axes) if axes else default_axes_dims_rope(head_dim)
    if f"{key_prefix}__index_timestep_zero__" in state_dict:
        config["default_ref_method"] = "index_timestep_zero"
    if f"{key_prefix}time_text_embed.addition_t_embedding.weight" in state_dict:
        config["use_additional_t_cond"] = True
    return config


def model_config_from_unet(state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None):
    unet_config = detect_unet_config(state_dict, unet_key_prefix, metadata=metadata)
    if unet_config is None:
        return None
    logger.info("Detected Qwen-Image: %s", unet_config)
    return supported_models.QwenImage(unet_config)

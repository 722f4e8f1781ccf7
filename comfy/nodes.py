"""Stock loader nodes on the int4 path (upstream keeps these in the top-level ``nodes.py``)."""
import torch

import comfy.sd
import comfy.utils
from comfy import folder_paths

WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UNETLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "weight_dtype": (list(WEIGHT_DTYPES),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"

    def load_unet(self, unet_name, weight_dtype="default"):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES.get(weight_dtype) else {}
        return (comfy.sd.load_diffusion_model(path, model_options=options),)


class LoraLoader:
    def __init__(self):
        self.loaded_lora = None  # (path, state dict): a strength change does not re-read the file

    @classmethod
    def INPUT_TYPES(cls):
        strength = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": (folder_paths.get_filename_list("loras"),),
                             "strength_model": strength, "strength_clip": strength}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"

    def _lora_sd(self, lora_name):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if self.loaded_lora is None or self.loaded_lora[0] != path:
            self.loaded_lora = (path, comfy.utils.load_torch_file(path, safe_load=True))
        return self.loaded_lora[1]

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        return comfy.sd.load_lora_for_models(model, clip, self._lora_sd(lora_name), strength_model, strength_clip)


class LoraLoaderModelOnly(LoraLoader):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "lora_name": (folder_paths.get_filename_list("loras"),),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0,
                                                         "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"

    def load_lora_model_only(self, model, lora_name, strength_model):
        return (self.load_lora(model, None, lora_name, strength_model, 0)[0],)


NODE_CLASS_MAPPINGS = {"UNETLoader": UNETLoader, "LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly}

"""Per-architecture model configs (mirrors upstream ``comfy/supported_models.py``)."""
import torch

import comfy.ops
from comfy import model_base


class QwenImage:
    unet_config_defaults = {"image_model": "qwen_image"}

    def __init__(self, unet_config):
        self.unet_config = {**self.unet_config_defaults, **unet_config}
        self.quant_config = None
        self.unet_dtype = torch.float32
        self.manual_cast_dtype = None

    def set_inference_dtype(self, dtype, manual_cast_dtype):
        self.unet_dtype = dtype
        self.manual_cast_dtype = manual_cast_dtype

    def operations(self):
        compute = self.manual_cast_dtype or self.unet_dtype
        return comfy.ops.pick_operations(self.unet_dtype, compute, model_config=self)

    def get_model(self, state_dict=None, prefix="", device=None):
        return model_base.QwenImage(self, device=device)


models = [QwenImage]

"""Model wrappers holding a diffusion transformer as ``.diffusion_model`` (mirrors upstream ``comfy/model_base.py``)."""
import logging

import torch

from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy.quant import host as int4

logger = logging.getLogger(__name__)


class BaseModel(torch.nn.Module):
    def __init__(self, model_config, device=None, unet_model=None):
        super().__init__()
        self.model_config = model_config
        self.manual_cast_dtype = model_config.manual_cast_dtype
        self.diffusion_model = unet_model(**model_config.unet_config, device=device,
                                          dtype=model_config.unet_dtype,
                                          operations=model_config.operations())

    def load_model_weights(self, sd, unet_prefix=""):
        """Load ``sd`` (consumed key by key) into the transformer; returns (missing, unexpected) keys."""
        to_load = {k[len(unet_prefix):]: sd.pop(k) for k in list(sd) if k.startswith(unet_prefix)}
        result = int4.load_state_dict(self.diffusion_model, to_load, strict=False)  # int4 files: all or nothing
        missing = [k for k in result.missing_keys if not k.endswith("__index_timestep_zero__")]
        if missing:
            logger.warning("unet missing: %s", missing)
        if result.unexpected_keys:
            logger.warning("unet unexpected: %s", result.unexpected_keys)
        return missing, result.unexpected_keys

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        return self.diffusion_model(x, t, c_crossattn, **kwargs)

    def forward(self, *args, **kwargs):
        return self.apply_model(*args, **kwargs)


class QwenImage(BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, device=device, unet_model=QwenImageTransformer2DModel)

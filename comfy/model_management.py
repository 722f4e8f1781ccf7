"""Device and dtype choices (the small part of upstream ``comfy/model_management.py`` this path needs)."""
import torch


def get_torch_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def unet_dtype(device=None, model_params=0, supported_dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """bf16 on a GPU that has it, fp32 on the CPU (as upstream)."""
    device = device or get_torch_device()
    if device.type == "cuda" and torch.bfloat16 in supported_dtypes and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32

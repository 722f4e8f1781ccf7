"""Random but well-formed int4 layer tensors (kitchen's canonical names), for tests."""
import torch

from comfy.quant.formats import encode_config
from comfy.quant.packing import pack_int4


def svdquant_tensors(n, k, rank, dtype=torch.bfloat16, seed=0, act_unsigned=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g)
    return {
        "weight": pack_int4(codes),
        "weight_scale": (torch.rand(k // 64, n, generator=g) * 0.02 + 0.005).to(dtype),
        "weight_proj_down": (torch.randn(k, rank, generator=g) * 0.05).to(dtype),
        "weight_proj_up": (torch.randn(n, rank, generator=g) * 0.05).to(dtype),
        "weight_smooth_factor": (torch.rand(k, generator=g) + 0.5).to(dtype),
        "bias": (torch.randn(n, generator=g) * 0.1).to(dtype),
        "comfy_quant": encode_config({"format": "svdquant_w4a4", "rank": rank, "act_unsigned": act_unsigned,
                                      "group_size": 64}),
    }


def awq_tensors(n, k, group_size=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.005)
    return {
        "weight": pack_int4(torch.randint(0, 16, (n, k), generator=g)),
        "weight_scale": scale.to(dtype),
        "weight_zeros": (-0.5 * scale + torch.randn(k // group_size, n, generator=g) * 0.002).to(dtype),
        "bias": (torch.randn(n, generator=g) * 0.1).to(dtype),
        "comfy_quant": encode_config({"format": "awq_w4a16", "group_size": group_size}),
    }


def prefixed(prefix, tensors):
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def poisoned(t, value, *at):
    """A copy of ``t`` holding ``value`` at each index of ``at`` (default: the first element)."""
    out = t.clone()
    for index in at or [(0,) * t.dim()]:
        out[index] = value
    return out


def partial_files(folder) -> list[str]:
    """The writer's temporary files (``<out>.<hex>.partial``) left in ``folder``: none after any run."""
    import os
    return sorted(name for name in os.listdir(folder) if name.endswith(".partial"))


def cli_model_files(d, config) -> dict:
    """A float Qwen-Image file made from demo ``config``, its int4 file (rank 8) and a Nunchaku file, in ``d``."""
    import comfy.utils
    import nunchaku_fixtures as F
    from comfy.quant_tools.demo import synthetic_state_dict
    from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file

    sd = synthetic_state_dict(config)
    comfy.utils.save_torch_file(sd, d / "bf16.safetensors")
    quantize_file(d / "bf16.safetensors", d / "int4.safetensors", QuantizeOptions(rank=8), progress=False)
    nk, meta = F.to_nunchaku(F.make_natural(seed=0, num_blocks=1))
    comfy.utils.save_torch_file(nk, d / "svdq-int4_r32-qwen-image.safetensors", metadata=meta)
    return {"dir": d, "sd": sd, "float": d / "bf16.safetensors", "int4": d / "int4.safetensors",
            "nunchaku": d / "svdq-int4_r32-qwen-image.safetensors"}

"""Kitchen's row-major int4 storage: two 4-bit codes per int8 byte, low nibble = even column."""
import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) integer codes in [-8, 7] or [0, 15] -> (..., K/2) int8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of columns ({codes.shape[-1]})")
    c = codes.to(torch.int16) & 0x0F
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """(..., K/2) int8 -> (..., K) int16 codes, two's complement when ``signed``."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0x0F, b >> 4
    if signed:
        lo = lo - ((lo & 0x8) << 1)
        hi = hi - ((hi & 0x8) << 1)
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)

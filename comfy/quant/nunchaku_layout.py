"""Nunchaku's on-disk tensor orders → comfy-kitchen's natural row-major layouts (pure tensor functions).

Facts from the Nunchaku format (index splits and permutations); every function is the exact inverse
of how Nunchaku's kernels tile a tensor. Byte reinterpretations assume a little-endian host, as the
format itself does.
"""
from __future__ import annotations

from typing import Iterable

import torch


# ----------------------------------------------------------------------------------------------
# SVDQuant W4A4 unpacking (tile order -> natural order)
# ----------------------------------------------------------------------------------------------

def _w4a4_qweight_dims(qweight: torch.Tensor) -> tuple[int, int]:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"W4A4 qweight: expected a 2-D int8 tensor (N, K/2), got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % 128 or k % 64:
        raise ValueError(f"W4A4 qweight: expected N % 128 == 0 and K % 64 == 0, got N={n}, K={k}")
    return n, k


def unpack_w4a4_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku tile-packed W4A4 ``qweight`` (N, K/2) int8 -> natural signed codes (N, K) int8 in [-8, 7].

    Each int32 word of the tile holds 8 nibbles r (bits 4r); the word grid is
    (nt, kt, np, nl, kl, ns, ks) with n = nt*128 + np*16 + ns*8 + nl and k = kt*64 + ks*32 + kl*8 + r.
    The code -8 is kept as is.
    """
    n, k = _w4a4_qweight_dims(qweight)
    words = qweight.contiguous().view(torch.int32).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0x0F
    codes = nib - ((nib & 0x8) << 1)
    return codes.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k).to(torch.int8)


def unpack_w4a4_qweight_packed(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku tile-packed W4A4 ``qweight`` -> kitchen's row-major packed (N, K/2) int8.

    Byte b of a tile word holds nibbles r = 2b (low) and 2b + 1 (high), i.e. two adjacent columns,
    so the conversion is a pure byte permutation (bit-exact, equal to
    ``pack_int4(unpack_w4a4_qweight(qweight))``).
    """
    n, k = _w4a4_qweight_dims(qweight)
    tiles = qweight.contiguous().reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 4)
    return tiles.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k // 2).contiguous()


def unpack_w4a4_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """Nunchaku tile-packed W4A4 ``wscales`` (stored shape (G, N)) -> kitchen's natural (G, N)."""
    if wscales.dim() != 2 or wscales.shape[1] % 128:
        raise ValueError(f"W4A4 wscales: expected (G, N) with N % 128 == 0, got {tuple(wscales.shape)}")
    g, n = wscales.shape
    nat = wscales.contiguous().reshape(n // 128, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, g)
    return nat.t().contiguous()


def unpack_chunk16(vec: torch.Tensor) -> torch.Tensor:
    """16-chunk packed vector (W4A4 ``bias`` / ``smooth_factor``) -> natural order.

    Within every 16 elements the stored order is [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15].
    """
    if vec.dim() != 1 or vec.shape[0] % 16:
        raise ValueError(f"16-chunk vector: expected 1-D with length % 16 == 0, got {tuple(vec.shape)}")
    length = vec.shape[0]
    return vec.contiguous().reshape(length // 16, 4, 2, 2).permute(0, 2, 1, 3).reshape(length).contiguous()


unpack_bias = unpack_chunk16
unpack_smooth_factor = unpack_chunk16


def unpack_proj_up(proj_up: torch.Tensor) -> torch.Tensor:
    """Nunchaku 16x16 tile-packed ``proj_up`` (N, R) -> natural (N, R)."""
    if proj_up.dim() != 2 or proj_up.shape[0] % 16 or proj_up.shape[1] % 16:
        raise ValueError(f"proj_up: expected (N, R) with N, R multiples of 16, got {tuple(proj_up.shape)}")
    n, r = proj_up.shape
    return (proj_up.contiguous().reshape(n // 16, r // 16, 8, 4, 2, 2, 2)
            .permute(0, 4, 2, 1, 5, 3, 6).reshape(n, r).contiguous())


def unpack_proj_down(proj_down: torch.Tensor) -> torch.Tensor:
    """Nunchaku 16x16 tile-packed ``proj_down`` (stored (K, R)) -> kitchen's ``proj_down`` (K, R) = Aᵀ."""
    if proj_down.dim() != 2 or proj_down.shape[0] % 16 or proj_down.shape[1] % 16:
        raise ValueError(f"proj_down: expected (K, R) with K, R multiples of 16, got {tuple(proj_down.shape)}")
    k, r = proj_down.shape
    a = (proj_down.contiguous().reshape(k // 16, r // 16, 8, 4, 2, 2, 2)
         .permute(1, 4, 2, 0, 5, 3, 6).reshape(r, k))
    return a.t().contiguous()


# ----------------------------------------------------------------------------------------------
# AWQ W4A16 unpacking
# ----------------------------------------------------------------------------------------------

def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Nunchaku AWQ ``qweight`` (N/4, K/2) int32 -> unsigned codes (N, K) uint8 in [0, 15].

    Rows stay in stored (interleaved) output order; see :func:`awq_deinterleave`.
    Within every 32 input channels, 16-bit word j holds channel k = j + 8t at nibble t.
    """
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"AWQ qweight: expected a 2-D int32 tensor (N/4, K/2), got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
    if k % 64:
        raise ValueError(f"AWQ qweight: expected K % 64 == 0, got K={k}")
    words = (qweight.contiguous().view(torch.int16).reshape(n // 4, k // 64, 4, 16)
             .permute(0, 2, 1, 3).reshape(n, k // 4))
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int16, device=qweight.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0x0F  # (N, K/4, 4), masked so the arithmetic shift is harmless
    return nib.reshape(n, k // 32, 8, 4).permute(0, 1, 3, 2).reshape(n, k).to(torch.uint8)


def awq_deinterleave(t: torch.Tensor, s: int, dim: int = 0) -> torch.Tensor:
    """Undo Nunchaku's modulation output interleave along ``dim``.

    Stored output index ``d*S + j`` holds original output ``j*D + d``; the result is planar
    (``[slot 0 | slot 1 | ... | slot S-1]``, each D long).
    """
    dim = dim % t.dim()
    n = t.shape[dim]
    if n % s:
        raise ValueError(f"awq_deinterleave: size {n} of dim {dim} is not a multiple of {s}")
    shape = list(t.shape)
    v = t.reshape(*shape[:dim], n // s, s, *shape[dim + 1:])
    return v.transpose(dim, dim + 1).reshape(shape).contiguous()


def awq_zeros_to_kitchen(wzeros: torch.Tensor, wscales: torch.Tensor,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nunchaku zero points (``W = q*s + wzeros``) -> kitchen's (``W = (q - 8)*s + zeros``).

    ``zeros = wzeros + 8*wscales``, computed in fp32 and rounded once to ``dtype`` (default: wzeros').
    """
    if wzeros.shape != wscales.shape:
        raise ValueError(f"awq_zeros_to_kitchen: wzeros {tuple(wzeros.shape)} and wscales {tuple(wscales.shape)} differ")
    out = wzeros.to(torch.float32) + 8.0 * wscales.to(torch.float32)
    return out.to(dtype or wzeros.dtype)


def unfold_modulation_scale_bias(bias: torch.Tensor, s: int, scale_slots: Iterable[int]) -> torch.Tensor:
    """Subtract the folded "+1" of ``(1 + scale)`` from the scale slots of a planar modulation bias.

    The subtraction runs in fp32 and is rounded once to the bias dtype.
    """
    n = bias.shape[0]
    if bias.dim() != 1 or n % s:
        raise ValueError(f"modulation bias: expected 1-D length multiple of {s}, got {tuple(bias.shape)}")
    b = bias.to(torch.float32).reshape(s, n // s).clone()
    for j in scale_slots:
        b[j] -= 1.0
    return b.reshape(n).to(bias.dtype)

"""LoRA deltas as int4 layers take them: factor or dense form in, additive output terms out.

A delta never touches the packed weight. Formats either fold it into their own float side tensors
(SVDQuant's low-rank branch) or attach an output term computed on the layer's raw input.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from comfy.quant import kitchen

logger = logging.getLogger(__name__)

OUTPUT_TERMS = "int4_output_terms"


def as_parameter(qt, output_terms=()) -> torch.nn.Parameter:
    """``Parameter(qt)`` keeping ``qt``'s own side tensors, with additive ``output_terms`` attached.

    A LoRA's output terms live on the weight Parameter object itself, so putting the original
    Parameter back (a model patcher's backup) removes them, and they move with the weight.
    """
    p = kitchen.as_parameter(qt)
    if output_terms:
        setattr(p, OUTPUT_TERMS, tuple(output_terms))
    return p


def output_terms(weight) -> tuple:
    """The additive output terms a LoRA attached to this weight Parameter (empty when none)."""
    return getattr(weight, OUTPUT_TERMS, ())

@dataclass(frozen=True)
class LowRankDelta:
    """``ΔW = up @ down`` (strength already folded into ``up``), fp32, for a whole layer or a slice.

    ``offset = (dim, start, length)`` places the delta on rows (dim 0) or columns (dim 1) of a fused
    weight; ``up``/``down`` then have the slice's size on that axis. ``down_key`` (hashable, or None) is
    equal for deltas whose full ``down`` is the same tensor (one ``lora_A`` patching q, k and v), so a
    format that stacks downs for a share group appends it once.
    """

    up: torch.Tensor
    down: torch.Tensor
    offset: tuple[int, int, int] | None = None
    down_key: object = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def full_factors(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (N, r), down (r, K)) with the slice embedded in zeros."""
        up, down = self.up, self.down
        if self.offset is not None:
            dim, start, length = self.offset
            if dim == 0:
                up = up.new_zeros(out_features, self.rank)
                up[start:start + length] = self.up
            else:
                down = down.new_zeros(self.rank, in_features)
                down[:, start:start + length] = self.down
        return up, down


@dataclass(frozen=True)
class DenseDelta:
    """A full ``ΔW`` (strength applied), fp32, for adapters that are not low rank in factor form."""

    weight: torch.Tensor
    offset: tuple[int, int, int] | None = None

    def full_weight(self, out_features: int, in_features: int) -> torch.Tensor:
        if self.offset is None:
            return self.weight
        full = self.weight.new_zeros(out_features, in_features)
        full.narrow(self.offset[0], self.offset[1], self.offset[2]).copy_(self.weight)
        return full



class LowRankOutput(torch.nn.Module):
    """``y += (x @ downᵀ) @ upᵀ``: several LoRAs stacked into one pair of small matmuls."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("down", down, persistent=False)

    def forward(self, x):
        if self.down.device != x.device:  # the weight may live elsewhere (low-VRAM): follow the input
            self.to(x.device)
        x = x.to(self.down.dtype)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up)


class DenseOutput(torch.nn.Module):
    """``y += x @ ΔWᵀ``: exact for any adapter, at the cost of one float matmul."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x):
        if self.weight.device != x.device:
            self.to(x.device)
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)


def stacked_factors(deltas, out_features: int, in_features: int):
    """All low-rank deltas of one layer as one (up (N, Σr), down (Σr, K)) pair, or None."""
    pairs = [d.full_factors(out_features, in_features) for d in deltas if isinstance(d, LowRankDelta)]
    if not pairs:
        return None
    return torch.cat([u for u, _ in pairs], 1), torch.cat([d for _, d in pairs], 0)


def summed_dense(deltas, out_features: int, in_features: int):
    dense = [d.full_weight(out_features, in_features) for d in deltas if isinstance(d, DenseDelta)]
    return torch.stack(dense).sum(0) if dense else None


def truncate_to_low_rank(delta: DenseDelta, layer: str, max_rank: int, rel_tol: float) -> LowRankDelta | None:
    """The smallest-rank SVD truncation within ``rel_tol`` (relative Frobenius error), if ≤ ``max_rank``.

    Returns None when the delta needs more than ``max_rank`` singular vectors; the caller then applies
    it exactly as a dense term. The achieved error is logged either way.
    """
    w = delta.weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    total = s.square().sum()
    if total == 0:
        return LowRankDelta(w.new_zeros(w.shape[0], 1), w.new_zeros(1, w.shape[1]), delta.offset)
    tail = (total - s.square().cumsum(0)).clamp_min(0).sqrt() / total.sqrt()  # error keeping k+1 values
    within = torch.nonzero(tail <= rel_tol)
    rank = int(within[0]) + 1 if len(within) else len(s)
    if rank > max_rank:
        logger.info("%s: dense LoRA delta needs rank %d > %d for rel. error %.0e; applying it exactly as a dense term",
                    layer, rank, max_rank, rel_tol)
        return None
    err = float(tail[rank - 1])
    logger.info("%s: dense LoRA delta applied as rank-%d SVD, relative Frobenius error %.3e", layer, rank, err)
    return LowRankDelta(u[:, :rank] * s[:rank], vh[:rank], delta.offset)

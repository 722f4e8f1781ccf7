"""SVDQuant W4A4: signed int4 residual weight, int4 activations, a float low-rank branch on raw x.

A LoRA is appended to the low-rank branch (``proj_down ← [proj_down | Aᵀ]``, ``proj_up ← [proj_up | s·B]``),
which adds exactly ``s·(x Aᵀ) Bᵀ`` with no extra kernel. Siblings sharing one activation quantization
(q/k/v) get the same stacked ``proj_down`` and zero-padded ``proj_up`` columns, so sharing survives.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import torch

from comfy.quant import deltas as D
from comfy.quant import kernels, kitchen
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats.base import ZERO_REFUSED, ZERO_WARNED, QuantFormat, TensorSlot, is_int

logger = logging.getLogger(__name__)

GROUP_SIZE = 64
UNSIGNED_SHIFT = 0.171875
# Layers fed by a GELU: their main path runs unsigned (x + 0.171875). Used only when the JSON is silent.
POST_GELU_LAYERS = re.compile(r"(^|\.)((img|txt)_mlp\.net\.2|(img|txt)_mlp\.2|mlp_fc2|mlp_context_fc2)$")
# A dense (LoHa/LoKr) delta becomes extra rank when this few singular vectors reproduce it this well.
DENSE_MAX_RANK = 128
DENSE_REL_TOL = 1e-3


class SVDQuantW4A4(QuantFormat):
    name = "svdquant_w4a4"
    layout = kitchen.SVDQUANT_LAYOUT
    slots = (
        TensorSlot("weight", packed=True),
        TensorSlot("weight_scale", zero=ZERO_WARNED),
        TensorSlot("weight_proj_down", ("proj_down",)),
        TensorSlot("weight_proj_up", ("proj_up",)),
        TensorSlot("weight_smooth_factor", ("smooth_factor",), zero=ZERO_REFUSED),  # x / smooth_factor
    )

    def parse_config(self, conf: dict, layer: str) -> dict:
        group = conf.get("group_size", GROUP_SIZE)
        if not is_int(group) or group != GROUP_SIZE:
            raise QuantizedLayerError(layer, "comfy_quant.group_size", f"the integer {GROUP_SIZE}", repr(group))
        rank = conf.get("rank")
        if rank is not None and (not is_int(rank) or rank < 0):
            raise QuantizedLayerError(layer, "comfy_quant.rank", "a non-negative integer", repr(rank))
        if "act_unsigned" in conf:
            act_unsigned = conf["act_unsigned"]
            if not isinstance(act_unsigned, bool):
                raise QuantizedLayerError(layer, "comfy_quant.act_unsigned", "true or false", repr(act_unsigned))
        else:
            act_unsigned = bool(POST_GELU_LAYERS.search(layer))
            if act_unsigned:
                logger.info("%s: comfy_quant has no act_unsigned; assuming true for a post-GELU layer", layer)
        return {"format": self.name, "group_size": GROUP_SIZE, "rank": rank, "act_unsigned": act_unsigned}

    def config_json(self, qt) -> dict:
        p = qt._params
        return {"format": self.name, "group_size": GROUP_SIZE, "rank": int(p.proj_down.shape[1]),
                "act_unsigned": bool(p.act_unsigned)}

    def expected_shapes(self, out_features, in_features, conf, tensors):
        n, k = out_features, in_features
        layer_rank = tensors["weight_proj_down"].shape[-1] if tensors["weight_proj_down"].dim() == 2 else -1
        rank = conf["rank"] if conf.get("rank") is not None else layer_rank
        return {
            "weight": (n, k // 2),
            "weight_scale": (k // GROUP_SIZE, n),
            "weight_proj_down": (k, rank),
            "weight_proj_up": (n, rank),
            "weight_smooth_factor": (k,),
        }

    def layout_params(self, side, conf):
        return {"scale": side["weight_scale"], "proj_down": side["weight_proj_down"],
                "proj_up": side["weight_proj_up"], "smooth_factor": side["weight_smooth_factor"],
                "act_unsigned": conf["act_unsigned"]}

    def state_dict(self, qt):
        p = qt._params
        return {"weight": qt._qdata, "weight_scale": p.scale, "weight_proj_down": p.proj_down,
                "weight_proj_up": p.proj_up, "weight_smooth_factor": p.smooth_factor}

    def share_key(self, qt):
        p = qt._params
        return (self.name, p.smooth_factor.data_ptr(), p.proj_down.data_ptr(), bool(p.act_unsigned))

    def forward(self, x, qt, bias):
        kernel = kernels.w4a4_kernel(x.device)
        if kernel is not None and kernel.supports(x, qt):
            return kernel.linear(x, qt, bias)
        return super().forward(x, qt, bias)

    def grouped_forward(self, x, weights, biases):
        kernel = kernels.w4a4_kernel(x.device)
        if kernel is not None and all(kernel.supports(x, w) for w in weights):
            return kernel.grouped_linear(x, weights, biases)
        # callers check share_key on the resident weights; copies moved to x's device for this call
        # hold equal but distinct tensors, so kitchen is told to trust that check
        return kitchen.kitchen_tensor.svdquant_w4a4_grouped_linear(x, weights, biases, assume_shared_quant=True)

    def tie(self, weights):
        """Rebuild ``weights`` so equal ``smooth_factor``/``proj_down`` become one tensor (shared quant)."""
        first = weights[0]._params
        return [kitchen.QuantizedTensor(w._qdata, self.layout, dataclasses.replace(
            w._params, smooth_factor=first.smooth_factor, proj_down=first.proj_down)) for w in weights]

    def can_tie(self, weights) -> bool:
        return kitchen.kitchen_tensor.svdquant_w4a4_can_share_quant(weights, validate=True)

    def describe_delta(self, rank):
        if rank is not None:
            return f"appended rank {rank} to the low-rank branch"
        return (f"SVD into extra rank if <= {DENSE_MAX_RANK} singular vectors reach {DENSE_REL_TOL:g} "
                "relative error, else exact dense output term")

    def apply_deltas(self, members):
        factors = []  # (member index, up (N_i, r), down (r, K))
        dense = {}
        for i, (module, deltas) in enumerate(members):
            n, k = module.weight.shape
            for d in deltas:
                if isinstance(d, D.DenseDelta):
                    low = D.truncate_to_low_rank(d, module.quant_layer_name, DENSE_MAX_RANK, DENSE_REL_TOL)
                    if low is None:
                        dense.setdefault(i, []).append(d)
                        continue
                    d = low
                up, down = d.full_factors(n, k)
                factors.append((i, up, down))
        if factors:
            base = members[0][0].weight._params
            dev, dt = base.proj_down.device, base.proj_down.dtype
            downs = torch.cat([down for _, _, down in factors], 0).t().to(device=dev, dtype=dt)
            proj_down = torch.cat([base.proj_down, downs], 1)
            for i, (module, _) in enumerate(members):
                qt = module.weight
                n = qt.shape[0]
                ups = [up if j == i else up.new_zeros(n, up.shape[1]) for j, up, _ in factors]
                proj_up = torch.cat([qt._params.proj_up, torch.cat(ups, 1).to(device=dev, dtype=dt)], 1)
                params = dataclasses.replace(qt._params, proj_down=proj_down, proj_up=proj_up)
                module.weight = D.as_parameter(kitchen.QuantizedTensor(qt._qdata, self.layout, params),
                                                   D.output_terms(qt))
        for i, ds in dense.items():
            module = members[i][0]
            qt = module.weight
            n, k = qt.shape
            w = D.summed_dense(ds, n, k).to(device=qt._qdata.device, dtype=self.compute_dtype(qt))
            module.weight = D.as_parameter(qt, (*D.output_terms(qt), D.DenseOutput(w)))

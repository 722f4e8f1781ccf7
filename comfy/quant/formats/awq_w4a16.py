"""AWQ W4A16: unsigned int4 weight with per-group float scales and zero points, float activations.

Used for the AdaLN modulation linears (a few rows per call). A LoRA becomes an additive low-rank
term on the output, computed on the same input the layer sees.
"""
from __future__ import annotations


from comfy.quant import deltas as D
from comfy.quant import kernels, kitchen
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats.base import ZERO_WARNED, QuantFormat, TensorSlot, is_int

DEFAULT_GROUP_SIZE = 64


class AWQW4A16(QuantFormat):
    name = "awq_w4a16"
    layout = kitchen.AWQ_LAYOUT
    slots = (
        TensorSlot("weight", packed=True),
        TensorSlot("weight_scale", zero=ZERO_WARNED),
        TensorSlot("weight_zeros", ("weight_zero",)),  # any finite value (0 is ordinary)
    )

    def parse_config(self, conf: dict, layer: str) -> dict:
        group = conf.get("group_size", DEFAULT_GROUP_SIZE)
        if not is_int(group) or group <= 0 or group % 2:
            raise QuantizedLayerError(layer, "comfy_quant.group_size", "a positive even integer", repr(group))
        return {"format": self.name, "group_size": group}

    def config_json(self, qt) -> dict:
        return {"format": self.name, "group_size": int(qt._params.group_size)}

    def expected_shapes(self, out_features, in_features, conf, tensors):
        n, k, g = out_features, in_features, conf["group_size"]
        return {"weight": (n, k // 2), "weight_scale": (k // g, n), "weight_zeros": (k // g, n)}

    def layout_params(self, side, conf):
        return {"scale": side["weight_scale"], "zeros": side["weight_zeros"], "group_size": conf["group_size"]}

    def state_dict(self, qt):
        p = qt._params
        return {"weight": qt._qdata, "weight_scale": p.scale, "weight_zeros": p.zeros}

    def forward(self, x, qt, bias):
        kernel = kernels.awq_kernel(x.device, x.numel() // max(1, x.shape[-1]))
        if kernel is not None and kernel.supports(x, qt):
            return kernel.linear(x, qt, bias)
        return super().forward(x, qt, bias)

    def describe_delta(self, rank):
        return f"additive rank-{rank} output term" if rank is not None else "additive dense output term (exact)"

    def apply_deltas(self, members):
        for module, deltas in members:
            qt = module.weight
            n, k = qt.shape
            dev, dt = qt._qdata.device, self.compute_dtype(qt)
            terms = list(D.output_terms(qt))
            low = D.stacked_factors(deltas, n, k)
            if low is not None:
                terms.append(D.LowRankOutput(low[0].to(device=dev, dtype=dt), low[1].to(device=dev, dtype=dt)))
            dense = D.summed_dense(deltas, n, k)
            if dense is not None:
                terms.append(D.DenseOutput(dense.to(device=dev, dtype=dt)))
            module.weight = D.as_parameter(qt, terms)

"""SVDQuant W4A4: signed int4 residual weight, int4 activations, a float low-rank branch on raw x.

A LoRA is appended to the low-rank branch (``proj_down ← [proj_down | Aᵀ]``, ``proj_up ← [proj_up | s·B]``),
which adds exactly ``s·(x Aᵀ) Bᵀ`` with no extra kernel. Siblings sharing one activation quantization
(q/k/v) keep sharing it: they get ONE stacked ``proj_down = [base | member 0's LoRA columns | member 1's |
...]`` (a down factor several members share, e.g. one ``lora_A`` of a fused-qkv LoRA, appears once), so
``x @ proj_down`` runs once per group, and each member a compact ``proj_up`` of only its own columns,
``(N, R0 + R1)``: the base rank (columns ``[0, R0)`` of ``x @ proj_down``) and its LoRA's (columns
``[C1, C1 + R1)``). Its weight's params carry ``lora_cols = (R0, C1)`` (``ColumnMappedParams``); the
project's GEMMs read the two column segments directly, so no member multiplies its siblings' ranks.
Kitchen's kernels know no column map: on that path (and in a saved state dict) a member's ``proj_up`` is
widened to all of ``proj_down``'s columns with zeros for its siblings' (``kitchen_view``), per call, so
no zero-padded copy stays resident. A member whose columns are the whole tail of ``proj_down`` (a lone
layer, or the only LoRA'd member of its group) gets no map and is a plain kitchen weight.

Input-split (K-split) layers. A layer whose input is the concatenation of parts with different
activation signedness (Flux's single-block ``linear2``: the attention output, signed, then the GELU
output, unsigned) is ONE layer with its tensors concatenated along K and the JSON
``"act_unsigned": [false, true], "in_splits": [K1, K2]`` (each a multiple of 64, summing to K). Its
semantics: each part's activation is quantized per 64-group with its own signedness (an unsigned part
is shifted by 0.171875), the main path is the sum over the parts, the low-rank branch reads the whole
raw input once, the bias is added once. The loaded weight is one kitchen ``QuantizedTensor`` whose
``act_unsigned`` field holds an ``InputSplit`` instead of a bool (it travels through moves, ties and
LoRA rebuilds like any other field, and refuses to be read as a bool, so a kitchen call on the whole
layer raises instead of running one part on the wrong grid). Kitchen runs one signedness per call, so
its path runs one call per part on K-slices of the stored tensors (codes columns, scale rows, smooth,
proj_down rows with the full proj_up: the parts' low-rank terms sum to the whole branch) and sums the
parts in fp32 with the bias; the project's Triton kernel quantizes each part with its own signedness
into one code buffer and runs the GEMM and the low-rank branch once over the whole K.
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
# Layers fed by a GELU: their main path runs unsigned (x + 0.171875). Used only when the JSON is silent, as
# ComfyUI PR #13580 does for Qwen-Image's img_mlp.net.2 / txt_mlp.net.2 (its files carry no act_unsigned).
POST_GELU_LAYERS = re.compile(r"(^|\.)((img|txt)_mlp\.net\.2|(img|txt)_mlp\.2|mlp_fc2|mlp_context_fc2)$")
# Layers whose input joins a signed and a GELU (unsigned) part (Flux's single-block linear2): no one default
# is right, so a JSON without act_unsigned is refused.
INPUT_SPLIT_LAYERS = re.compile(r"(^|\.)single_blocks\.\d+\.linear2$")
# A dense (LoHa/LoKr) delta becomes extra rank when this few singular vectors reproduce it this well.
DENSE_MAX_RANK = 128
DENSE_REL_TOL = 1e-3


@dataclasses.dataclass(frozen=True)
class InputSplit:
    """The ``act_unsigned`` of an input-split layer: part widths along K and each part's signedness."""

    in_splits: tuple[int, ...]
    unsigned: tuple[bool, ...]

    def __bool__(self):
        raise TypeError("an input-split SVDQuant layer has one act_unsigned per input part "
                        f"({list(self.unsigned)} over {list(self.in_splits)}); run it through its format "
                        "(comfy.quant.formats), not as one kitchen call")

    def runs(self) -> tuple[tuple[int, int, bool], ...]:
        """``(start, stop, unsigned)`` column ranges, neighbouring parts of one signedness merged (the
        64-groups quantize independently, so a merged run computes exactly what its parts do)."""
        out, start = [], 0
        for width, unsigned in zip(self.in_splits, self.unsigned):
            if out and out[-1][2] == unsigned:
                out[-1] = (out[-1][0], start + width, unsigned)
            else:
                out.append((start, start + width, unsigned))
            start += width
        return tuple(out)

    def json(self) -> dict:
        return {"act_unsigned": list(self.unsigned), "in_splits": list(self.in_splits)}


def input_split(qt) -> InputSplit | None:
    """The ``InputSplit`` of an SVDQuant weight, or None for a layer of one signedness."""
    au = qt._params.act_unsigned
    return au if isinstance(au, InputSplit) else None


_KITCHEN_PARAMS = getattr(kitchen.layout_class(kitchen.SVDQUANT_LAYOUT), "Params", None)

if _KITCHEN_PARAMS is not None:
    @dataclasses.dataclass(frozen=True)
    class ColumnMappedParams(_KITCHEN_PARAMS):
        """Kitchen's SVDQuant params plus ``lora_cols = (R0, C1)``: ``proj_up`` is compact, its first R0
        columns meet columns ``[0, R0)`` of ``x @ proj_down`` and the rest columns ``[C1, ...)``. A subclass
        field, so it travels through every kitchen move and copy (they rebuild ``type(params)`` from all
        fields) and through ``dataclasses.replace``."""

        lora_cols: tuple[int, int] | None = None
else:  # kitchen missing: no SVDQuant weight can exist
    ColumnMappedParams = None


def lora_columns(qt) -> tuple[int, int] | None:
    """``(R0, C1)`` of a share-group member with a compact ``proj_up`` (see the module docstring), else None."""
    return getattr(qt._params, "lora_cols", None)


def _params_with(p, lora_cols, **changes):
    """``p`` with ``changes``, as plain kitchen params (``lora_cols`` None) or column-mapped ones."""
    fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(_KITCHEN_PARAMS)}
    fields.update(changes)
    return _KITCHEN_PARAMS(**fields) if lora_cols is None else ColumnMappedParams(**fields, lora_cols=lora_cols)


def widened_proj_up(qt) -> torch.Tensor:
    """A column-mapped member's ``proj_up`` over all of ``proj_down``'s columns: its own columns where the map
    puts them, zeros for its siblings' (what kitchen's kernels and a saved file expect)."""
    p = qt._params
    r0, c1 = lora_columns(qt)
    up = p.proj_up
    n, own = up.shape[0], up.shape[1] - r0
    zero = up.new_zeros(())  # stride-0 zeros: one small concatenation, no zero-filled buffer first
    return torch.cat([up[:, :r0], zero.expand(n, c1 - r0), up[:, r0:],
                      zero.expand(n, p.proj_down.shape[1] - c1 - own)], 1)


def kitchen_view(qt):
    """``qt`` as kitchen's kernels can run it: a column-mapped member with its ``proj_up`` widened (a new
    tensor per call: kitchen is the path of devices without the project's kernels, and this keeps no
    zero-padded copy resident); any other weight as it is."""
    if lora_columns(qt) is None:
        return qt
    params = _params_with(qt._params, None, proj_up=widened_proj_up(qt))
    return kitchen.QuantizedTensor(qt._qdata, qt._layout_cls, params)


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
        if "in_splits" in conf or isinstance(conf.get("act_unsigned"), list):
            act_unsigned, in_splits = self._parse_split(conf, layer)
            return {"format": self.name, "group_size": GROUP_SIZE, "rank": rank, "act_unsigned": act_unsigned,
                    "in_splits": in_splits}
        if "act_unsigned" in conf:
            act_unsigned = conf["act_unsigned"]
            if not isinstance(act_unsigned, bool):
                raise QuantizedLayerError(layer, "comfy_quant.act_unsigned",
                                          "true or false (or a list of them, with in_splits)", repr(act_unsigned))
        elif INPUT_SPLIT_LAYERS.search(layer):
            raise QuantizedLayerError(layer, "comfy_quant.act_unsigned", "a list of true/false with in_splits (its "
                                      "input joins a signed and a post-GELU part: no default is right)", "nothing")
        else:
            act_unsigned = bool(POST_GELU_LAYERS.search(layer))
            if act_unsigned:
                logger.info("%s: comfy_quant has no act_unsigned; assuming true for a post-GELU layer", layer)
        return {"format": self.name, "group_size": GROUP_SIZE, "rank": rank, "act_unsigned": act_unsigned}

    @staticmethod
    def _parse_split(conf: dict, layer: str) -> tuple[list[bool], list[int]]:
        """``act_unsigned`` (a list of bools) and ``in_splits`` (positive multiples of 64, one per part) of an
        input-split layer; their sum is checked against the layer's width in ``validate``."""
        au, splits = conf.get("act_unsigned"), conf.get("in_splits")
        if not isinstance(splits, list) or not splits or not all(is_int(w) for w in splits):
            raise QuantizedLayerError(layer, "comfy_quant.in_splits",
                                      "a non-empty list of input widths beside a list act_unsigned",
                                      "nothing" if splits is None else repr(splits)[:200])
        if not all(w > 0 and w % GROUP_SIZE == 0 for w in splits):
            raise QuantizedLayerError(layer, "comfy_quant.in_splits",
                                      f"positive multiples of the group size {GROUP_SIZE}", repr(splits)[:200])
        if not isinstance(au, list) or not all(isinstance(v, bool) for v in au):
            raise QuantizedLayerError(layer, "comfy_quant.act_unsigned",
                                      "a list of true/false, one per in_splits part",
                                      "nothing" if au is None else repr(au)[:200])
        if len(au) != len(splits):
            raise QuantizedLayerError(layer, "comfy_quant.act_unsigned",
                                      f"{len(splits)} values (one per in_splits part)", f"{len(au)}: {au!r}"[:200])
        return list(au), list(splits)

    def validate(self, layer, tensors, out_features, in_features, conf):
        splits = conf.get("in_splits")
        if splits is not None and sum(splits) != in_features:
            raise QuantizedLayerError(layer, "comfy_quant.in_splits", f"parts summing to in_features {in_features}",
                                      f"{splits} (sum {sum(splits)})")
        return super().validate(layer, tensors, out_features, in_features, conf)

    def config_json(self, qt) -> dict:
        p = qt._params
        conf = {"format": self.name, "group_size": GROUP_SIZE, "rank": int(p.proj_down.shape[1])}
        split = input_split(qt)
        return {**conf, **split.json()} if split is not None else {**conf, "act_unsigned": bool(p.act_unsigned)}

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
                "act_unsigned": (InputSplit(tuple(conf["in_splits"]), tuple(conf["act_unsigned"]))
                                 if "in_splits" in conf else conf["act_unsigned"])}

    def state_dict(self, qt):
        """The stored tensors; a column-mapped member writes its widened ``proj_up`` (a file holds no column
        map: loaded again, the layer computes the same function with its siblings' columns as zeros)."""
        p = qt._params
        proj_up = p.proj_up if lora_columns(qt) is None else widened_proj_up(qt)
        return {"weight": qt._qdata, "weight_scale": p.scale, "weight_proj_down": p.proj_down,
                "weight_proj_up": proj_up, "weight_smooth_factor": p.smooth_factor}

    def share_key(self, qt):
        """Equal for weights on the same smoothing and ``proj_down`` tensors with the same signedness; an
        input-split layer's key holds its whole split, so it shares only with an identically split one."""
        p = qt._params
        split = input_split(qt)
        return (self.name, p.smooth_factor.data_ptr(), p.proj_down.data_ptr(),
                split if split is not None else bool(p.act_unsigned))

    def forward(self, x, qt, bias):
        kernel = kernels.w4a4_kernel(x.device)
        if kernel is not None and kernel.supports(x, qt):
            return kernel.linear(x, qt, bias)  # runs input-split layers and column maps natively
        qt = kitchen_view(qt)
        if input_split(qt) is not None:
            return self._split_forward(x, qt, bias)
        return super().forward(x, qt, bias)

    def grouped_forward(self, x, weights, biases):
        kernel = kernels.w4a4_kernel(x.device)
        if kernel is not None and all(kernel.supports(x, w) for w in weights):
            return kernel.grouped_linear(x, weights, biases)
        if input_split(weights[0]) is not None:  # kitchen shares one signedness only: one layer at a time
            return [self.forward(x, w, b) for w, b in zip(weights, biases)]
        # callers check share_key on the resident weights; copies moved to x's device for this call
        # hold equal but distinct tensors, so kitchen is told to trust that check
        return kitchen.kitchen_tensor.svdquant_w4a4_grouped_linear(x, [kitchen_view(w) for w in weights], biases,
                                                                   assume_shared_quant=True)

    def _part(self, qt, start: int, stop: int, unsigned: bool):
        """A plain kitchen weight for input columns ``start:stop`` of ``qt``: its codes (a contiguous copy:
        kitchen's kernels read the weight densely), weight-scale rows, smoothing and ``proj_down`` rows
        (views) and the full ``proj_up``, with one signedness."""
        p = qt._params
        n = qt._qdata.shape[0]
        params = dataclasses.replace(
            p, scale=p.scale[start // GROUP_SIZE:stop // GROUP_SIZE], orig_shape=(n, stop - start),
            proj_down=p.proj_down[start:stop], smooth_factor=p.smooth_factor[start:stop], act_unsigned=unsigned)
        return kitchen.QuantizedTensor(qt._qdata[:, start // 2:stop // 2].contiguous(), self.layout, params)

    def _split_forward(self, x, qt, bias):
        """Kitchen's path for an input-split layer: one kitchen call per run of one signedness on its
        slices (``_part``), the parts' outputs and the bias summed in fp32, rounded once to x's dtype.
        The parts' low-rank terms (``x_i @ proj_down[i] @ proj_upᵀ``) sum to the whole branch."""
        runs = input_split(qt).runs()
        if len(runs) == 1:  # one signedness over all of K: the plain layer
            p = qt._params
            whole = kitchen.QuantizedTensor(qt._qdata, self.layout, dataclasses.replace(p, act_unsigned=runs[0][2]))
            return torch.nn.functional.linear(x, whole, bias)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        acc = None if bias is None else bias.float()
        for start, stop, unsigned in runs:
            y = torch.nn.functional.linear(x2[:, start:stop].contiguous(), self._part(qt, start, stop, unsigned))
            acc = y.float() if acc is None else acc + y.float()
        return acc.to(x.dtype).reshape(*lead, acc.shape[-1])

    def tie(self, weights):
        """Rebuild ``weights`` so equal ``smooth_factor``/``proj_down`` become one tensor (shared quant)."""
        first = weights[0]._params
        return [kitchen.QuantizedTensor(w._qdata, self.layout, dataclasses.replace(
            w._params, smooth_factor=first.smooth_factor, proj_down=first.proj_down)) for w in weights]

    def can_tie(self, weights) -> bool:
        splits = [input_split(w) for w in weights]
        if any(sp is not None for sp in splits):  # only identically split layers; kitchen compares the rest
            if any(sp != splits[0] for sp in splits):
                return False
            weights = [kitchen.QuantizedTensor(w._qdata, self.layout,
                                               dataclasses.replace(w._params, act_unsigned=False)) for w in weights]
        return kitchen.kitchen_tensor.svdquant_w4a4_can_share_quant(weights, validate=True)

    def describe_delta(self, rank):
        if rank is not None:
            return f"appended rank {rank} to the low-rank branch"
        return (f"SVD into extra rank if <= {DENSE_MAX_RANK} singular vectors reach {DENSE_REL_TOL:g} "
                "relative error, else exact dense output term")

    def apply_deltas(self, members):
        low, dense = self._low_rank_factors(members)
        if any(low):
            self._append_columns(members, low)
        for i, ds in dense.items():
            module = members[i][0]
            qt = module.weight
            n, k = qt.shape
            w = D.summed_dense(ds, n, k).to(device=qt._qdata.device, dtype=self.compute_dtype(qt))
            module.weight = D.as_parameter(qt, (*D.output_terms(qt), D.DenseOutput(w)))

    @staticmethod
    def _low_rank_factors(members):
        """Per member ``[(up (N, r), down (r, K), down_key)]`` (dense deltas SVD-truncated where they allow)
        and ``{member index: [dense deltas kept exact]}``."""
        low, dense = [], {}
        for i, (module, deltas) in enumerate(members):
            n, k = module.weight.shape
            mine = []
            for d in deltas:
                if isinstance(d, D.DenseDelta):
                    truncated = D.truncate_to_low_rank(d, module.quant_layer_name, DENSE_MAX_RANK, DENSE_REL_TOL)
                    if truncated is None:
                        dense.setdefault(i, []).append(d)
                        continue
                    d = truncated
                mine.append((*d.full_factors(n, k), d.down_key))
            low.append(mine)
        return low, dense

    def _append_columns(self, members, low):
        """One shared ``proj_down = [base | appended downs]`` (a down with a ``down_key`` seen before is not
        appended again) and each member's compact ``proj_up`` over its own columns."""
        base = members[0][0].weight._params
        dev, dt = base.proj_down.device, base.proj_down.dtype
        r0 = base.proj_down.shape[1]
        starts, downs, uses, end = {}, [], [], r0
        for mine in low:
            used = []
            for up, down, key in mine:
                start = starts.get(key) if key is not None else None
                if start is None:
                    start, end = end, end + down.shape[0]
                    downs.append(down)
                    if key is not None:
                        starts[key] = start
                used.append((start, up))
            uses.append(used)
        proj_down = torch.cat([base.proj_down, torch.cat(downs, 0).t().to(device=dev, dtype=dt)], 1)
        for (module, _), used in zip(members, uses):
            qt = module.weight
            proj_up, cols = _compact_up(qt._params.proj_up, used, r0, end, dt)
            params = _params_with(qt._params, cols, proj_down=proj_down, proj_up=proj_up)
            module.weight = D.as_parameter(kitchen.QuantizedTensor(qt._qdata, self.layout, params),
                                           D.output_terms(qt))


def _compact_up(base_up, used, r0: int, end: int, dt):
    """``(proj_up, lora_cols)`` of one member: ``[base_up | its LoRA columns]`` and where those sit in the shared
    ``proj_down`` (``used = [(start column, up (N, r) fp32)]``). Its columns are the span from its first to
    its last one; a sibling's down inside that span (a rare overlap of shared downs) gets zeros, and ups of
    one shared down add in fp32 before the one rounding to the compute dtype. None for a map that is the
    plain layout (its columns are all of proj_down's tail)."""
    if not used:
        return base_up, (None if end == r0 else (r0, r0))
    used = sorted(used, key=lambda su: su[0])
    lo, hi = used[0][0], max(s + up.shape[1] for s, up in used)
    if all(s == (lo if j == 0 else used[j - 1][0] + used[j - 1][1].shape[1]) for j, (s, _) in enumerate(used)):
        own = torch.cat([up for _, up in used], 1) if len(used) > 1 else used[0][1]
    else:
        own = used[0][1].new_zeros(used[0][1].shape[0], hi - lo)
        for s, up in used:
            own[:, s - lo:s - lo + up.shape[1]] += up
    proj_up = torch.cat([base_up, own.to(device=base_up.device, dtype=dt)], 1)
    return proj_up, (None if lo == r0 and hi == end else (r0, lo))

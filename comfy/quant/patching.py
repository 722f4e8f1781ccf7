"""LoRA patches for a host's model patcher: checked up front (every target), applied to int4 weights as deltas.

An int4 weight cannot be dequantized, merged and requantized (kitchen cannot requantize these
layouts, and a 4-bit grid would erase the delta), so a patch lands as a delta the weight's format
takes (``QuantFormat.apply_deltas``). A model patcher calls:

* ``patch_problem(weight, adapter, offset, function, strength_model, strength_patch)`` in ``add_patches``
  for EVERY target, float or int4: why this patch cannot apply to this weight (a sentence: log it, do
  not queue the patch, queue the rest), or None. It runs ``adapter_problem`` (the target-free checks:
  strengths, alpha, factor shapes, finite values) and the target's own (offset, shape, int4 rules), so
  ``patch_model`` never meets a bad patch halfway;
* ``strength_problem(strength, name)`` / ``check_strength(strength, name)`` once per LoRA, before
  anything is patched (``load_lora_for_models``: ``check_strength`` raises ``LoraError``);
* ``patch_weight(model, key, patches, backup, device_to)`` where it would merge a float weight:
  patches ``key``'s whole share group (q/k/v quantize one activation, so they change together)
  and records each member's original Parameter in ``backup[key] = Backup(weight, False)``;
* ``group_is_patched(model, key, patches)``: whether ``key``'s weight changes when ``patches`` apply
  (its own, or a sibling's in its share group), for loaders that must load such a weight whole.

Restoring is the host's ordinary backup restore: put ``backup[key].weight`` back as is (the same
Parameter object, not re-wrapped). Adapters are read through ``low_rank()``, ``delta_weight(shape)``
and ``dora_scale`` (the weight-adapter delta API), and checked through their ``name`` and ``weights``
tuple (the layouts upstream's LoRA/LoHa/LoKr adapters share); ``("diff", (tensor,))`` patches are
dense deltas.
"""
from __future__ import annotations

import collections
import logging
import math
import weakref

import torch

from comfy.quant import deltas as D
from comfy.quant import formats
from comfy.quant.errors import LoraError
from comfy.quant.formats.base import FLOAT_DTYPES, nonfinite_summary
from comfy.quant.layer import move_weight

logger = logging.getLogger(__name__)

# the shape of upstream ComfyUI's ModelPatcher.backup entries
Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def _target_shape(weight, offset):
    shape = list(weight.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return tuple(shape)


def patch_problem(weight, adapter, offset=None, function=None, strength_model=1.0, strength_patch=1.0) -> str | None:
    """Why ``adapter`` cannot apply to ``weight`` (a sentence naming what is wrong), or None when it can.

    Any target: a float weight gets ``adapter_problem`` plus the offset and shape checks, an int4 weight
    also the int4 rules (additive deltas only). Never raises, so one bad patch is refused, not the LoRA.
    """
    problem = adapter_problem(adapter, strength_patch, strength_model) or _offset_problem(weight, offset)
    if problem:
        return problem
    shape = _target_shape(weight, offset)
    try:
        if formats.format_of(weight) is None:
            return _float_fit_problem(adapter, shape)
        return _int4_problem(weight, adapter, function, strength_model, shape)
    except _Malformed as e:
        return str(e)


def _offset_problem(weight, offset) -> str | None:
    if offset is None:
        return None
    try:
        dim, start, length = (int(v) for v in offset[:3])
    except (TypeError, ValueError):
        return f"offset {offset!r} is not (dim, start, length)"
    if not 0 <= dim < weight.dim() or start < 0 or length <= 0 or start + length > weight.shape[dim]:
        return f"offset {tuple(offset)} outside the weight's shape {tuple(weight.shape)}"
    return None


def _fits(delta_shape, target_shape) -> bool:
    """A 2-D delta ``(N, K)`` on a target: 2-D exactly, n-D ``(N, *rest)`` with ``K = prod(rest)``, 1-D by count."""
    n, k = delta_shape
    if len(target_shape) <= 1:
        return n * k == math.prod(target_shape)
    return n == target_shape[0] and k == math.prod(target_shape[1:])


def _float_fit_problem(adapter, shape) -> str | None:
    if isinstance(adapter, list):  # a merge: [(another model's weight, convert), patches...]
        return None
    if isinstance(adapter, tuple):
        kind, payload = _tuple_parts(adapter)
        padded = len(payload) > 1 and isinstance(payload[1], dict) and payload[1].get("pad_weight")
        if kind not in ("diff", "set") or padded:
            return None
        got = tuple(payload[0].shape)
        return None if got == shape else f"'{kind}' tensor of shape {got} does not fit {shape}"
    got = _delta_shape(adapter)
    if got is None or _fits(got, shape):
        return None
    return f"adapter delta of shape {got} does not fit the target shape {shape}"


def _int4_problem(weight, adapter, function, strength_model, shape) -> str | None:
    fmt = formats.format_of(weight).name
    if strength_model != 1.0 or function is not None:
        return f"strength_model/function patches cannot apply to a quantized ({fmt}) weight"
    if isinstance(adapter, (tuple, list)):
        kind = _tuple_parts(adapter)[0] if isinstance(adapter, tuple) else "merge"
        if kind != "diff":
            return f"a '{kind}' patch would replace a quantized ({fmt}) weight; only additive patches apply"
        got = tuple(_tuple_parts(adapter)[1][0].shape)
        return None if got == shape else f"'diff' tensor of shape {got} does not fit {shape}"
    name = getattr(adapter, "name", type(adapter).__name__)
    if name not in ADDITIVE:
        return (f"a '{name}' adapter is not an additive delta (it depends on the base weight), which a "
                f"quantized ({fmt}) weight cannot take; load this LoRA on a float model")
    if getattr(adapter, "dora_scale", None) is not None:
        return (f"DoRA rescales the whole weight, which a quantized ({fmt}) weight cannot take "
                f"without requantizing; load this LoRA on a float model")
    if name == "lora" and adapter.weights[5] is not None:
        return f"a LoRA with 'reshape' pads the whole weight, which a quantized ({fmt}) weight cannot take"
    got = _delta_shape(adapter)
    return None if got == shape else f"adapter delta of shape {got} does not fit the target shape {shape}"


# ------------------------------------------------------------------ adapter checks (any target)
MAX_STRENGTH = 100.0  # LoraLoader's strength inputs range over [-100, 100]
_F32_MAX = torch.finfo(torch.float32).max
# the largest activation whose square is finite in float32: every block squares its activations (the
# variance of LayerNorm / RMSNorm, q·k in attention), so a larger one makes the model's output NaN / Inf
_ACTIVATION_MAX = math.sqrt(_F32_MAX)

# tensor names of the ``weights`` slots of the adapter layouts both hosts share
_SLOTS = {
    "lora": ("lora_up/B", "lora_down/A", "alpha", "lora_mid", "dora_scale", "reshape"),
    "loha": ("hada_w1_a", "hada_w1_b", "alpha", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "dora_scale"),
    "lokr": ("lokr_w1", "lokr_w2", "alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
             "dora_scale"),
}
ADDITIVE = frozenset(_SLOTS)  # adapters whose delta does not depend on the base weight


class _Malformed(Exception):
    """Adapter tensors that do not compose; the message names them, their shapes and what was expected."""


def strength_problem(strength, name="strength") -> str | None:
    """Why ``strength`` cannot scale a LoRA (not a finite number, or outside ±100), or None."""
    try:
        s = float(strength)
    except (TypeError, ValueError, RuntimeError):
        return f"{name} {strength!r} is not a number"
    if not math.isfinite(s):
        return f"{name} {s} is not a finite number"
    if abs(s) > MAX_STRENGTH:
        return f"{name} {s:g} is outside [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}] (LoraLoader's strength range)"
    return None


def check_strength(strength, name="strength_model") -> None:
    """Raise ``LoraError`` when ``strength`` cannot scale a LoRA; call it before anything is patched."""
    problem = strength_problem(strength, name)
    if problem:
        raise LoraError(f"LoRA not applied: {problem}; nothing was patched", tensor=name,
                        expected=f"a finite number within ±{MAX_STRENGTH:g}", got=strength)


def adapter_problem(adapter, strength_patch=1.0, strength_model=1.0, scan_values=True) -> str | None:
    """Why ``adapter`` (a weight adapter or a ``("diff", (tensor,))``-style tuple) cannot apply to any
    weight, or None: strengths finite within ±100, alpha a finite scalar, factors that compose (ranks
    agree, no 0-d or empty factors, LoHa/LoKr products of one shape) and, with ``scan_values``, every
    tensor finite, the delta's bound (|factors| × ranks × alpha scale × strength) within float32, and that
    bound × in_features (how far the delta can move one output per unit of input) within ``_ACTIVATION_MAX``.
    Never raises."""
    problem = strength_problem(strength_patch, "strength") or strength_problem(strength_model, "strength_model")
    if problem:
        return problem
    try:
        return _structure_and_values(adapter, float(strength_patch), scan_values)
    except _Malformed as e:
        return str(e)
    except (ArithmeticError, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
        # what torch and the adapters raise on malformed factors is reported, never raised
        return f"malformed patch: {type(e).__name__}: {e}"


def _tuple_parts(adapter):
    """``(kind, payload)`` of a tuple patch: ``("diff", (t,))``, ``("set", (t,))``, or the old ``(t,)``."""
    if isinstance(adapter[0], str):
        payload = adapter[1] if len(adapter) > 1 else ()
        return adapter[0], tuple(payload) if isinstance(payload, (tuple, list)) else (payload,)
    return "diff", tuple(adapter)


def _structure_and_values(adapter, strength, scan_values) -> str | None:
    if isinstance(adapter, list):  # a merge patch carries the host's own weights
        return None
    if isinstance(adapter, tuple):
        kind, payload = _tuple_parts(adapter)
        tensors = [(f"'{kind}' tensor", t) for t in payload if isinstance(t, torch.Tensor)]
        _need(tensors, f"'{kind}' patch holds no tensor")
        bound = (lambda m: m(tensors[0][1])) if kind == "diff" else None
        width = math.prod(tensors[0][1].shape[1:])
    else:
        name = getattr(adapter, "name", type(adapter).__name__)
        weights = getattr(adapter, "weights", None)
        _need(isinstance(weights, (tuple, list)), f"'{name}' adapter has no weights tuple")
        slots = _SLOTS.get(name, ())
        labels = [slots[i] if i < len(slots) else f"weights[{i}]" for i in range(len(weights))]
        tensors = [(label, t) for label, t in zip(labels, weights) if isinstance(t, torch.Tensor)]
        if name in _SLOTS:
            _alpha_problem(weights[2])
        shape_fn = _SHAPES.get(name)
        bound = None if shape_fn is None else (lambda m: shape_fn(weights, m)[1])
        width = None if shape_fn is None else shape_fn(weights, lambda t: 0.0)[0][1]  # shapes compose (or _Malformed)
    return _values_problem(tensors, bound, strength, width) if scan_values else None


def _values_problem(tensors, bound, strength, width) -> str | None:
    amax = {}
    for label, t in tensors:
        amax[id(t)] = m = _amax(t)
        if not math.isfinite(m):
            return f"{label} of shape {tuple(t.shape)} holds {_non_finite(t)}"
    if bound is None:
        return None
    reach = abs(strength) * bound(lambda t: amax.get(id(t), 0.0))
    if not reach <= _F32_MAX:
        return (f"the delta can reach {reach:.3g} (|factors| × ranks × alpha scale × strength), more than "
                f"float32 holds ({_F32_MAX:.3g})")
    if not reach * width <= _ACTIVATION_MAX:
        return (f"the delta can move an output by {reach * width:.3g} per unit of input (|factors| × ranks × "
                f"alpha scale × strength × in_features {width}), more than an activation whose square float32 "
                f"holds ({_ACTIVATION_MAX:.3g}): the model's output would turn NaN / Inf")
    return None


# id(tensor) -> (weakref to it, its version, its max |value|): a LoRA's tensors are scanned once, not again on
# every strength change (each is a new clone whose add_patches checks the same tensors: on a 1 GiB LoRA a CPU
# pass over every factor per change). An entry leaves with its tensor.
_AMAX: dict = {}


def _version(t):
    """``t``'s in-place write counter; None for an inference tensor (it keeps none: such a tensor is written only
    inside inference mode, and no loader writes a LoRA's tensors after reading them)."""
    return None if t.is_inference() else t._version


def _amax(t) -> float:
    """max |t| (NaN when ``t`` holds a NaN); 0 for tensors without values (meta, empty). Remembered per tensor
    until it is written in place (``_AMAX``)."""
    hit = _AMAX.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == _version(t):
        return hit[2]
    m = _scan_amax(t)
    key = id(t)
    ref = weakref.ref(t, lambda r, key=key: _AMAX.pop(key) if _AMAX.get(key, (None,))[0] is r else None)
    _AMAX[key] = (ref, _version(t), m)
    return m


def _scan_amax(t) -> float:
    if t.device.type == "meta" or t.numel() == 0 or t.dtype == torch.bool:
        return 0.0
    t = t.detach()
    if t.is_complex():
        return float(t.abs().max())
    try:
        lo, hi = torch.aminmax(t)
    except RuntimeError:  # dtypes without aminmax (float8)
        lo, hi = torch.aminmax(t.float())
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(abs(lo), abs(hi))


def _non_finite(t) -> str:
    """What ``t`` (known to hold NaN or Inf) holds, as the layer checks say it (``formats.base.nonfinite_summary``)."""
    try:
        got = nonfinite_summary(t if t.dtype in (torch.float64, *FLOAT_DTYPES) else t.float())
    except RuntimeError:
        got = None
    return f"{got or 'non-finite values'}, expected finite values"


def lora_alpha(value):
    """A LoRA file's ``<prefix>.alpha`` as an adapter takes it: a number when the tensor holds one value,
    else the tensor itself, which ``adapter_problem`` refuses naming its shape (a host's ``.item()`` would
    raise and lose the whole LoRA). For hosts whose ``load_lora`` reads alphas directly."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _alpha_problem(alpha) -> None:
    if alpha is None:
        return
    if isinstance(alpha, torch.Tensor):
        _need(alpha.numel() == 1, f"alpha has shape {tuple(alpha.shape)}, expected a scalar (0-d or 1 element)")
        if alpha.device.type == "meta":
            return
        alpha = alpha.item()
    _need(isinstance(alpha, (int, float)) and not isinstance(alpha, bool), f"alpha {alpha!r} is not a number")
    _need(math.isfinite(alpha), f"alpha is {alpha}, expected a finite number")


def _need(ok, message) -> None:
    if not ok:
        raise _Malformed(message)


def _factor(name, t, ndim=None) -> tuple:
    """``t``'s shape, once it is a non-empty tensor of ``ndim`` dims (at least 2 when ``ndim`` is None)."""
    _need(t is not None, f"{name} is missing")
    _need(isinstance(t, torch.Tensor), f"{name} is a {type(t).__name__}, expected a tensor")
    shape = tuple(t.shape)
    want = "at least 2" if ndim is None else str(ndim)
    _need(t.dim() >= 2 if ndim is None else t.dim() == ndim, f"{name} has shape {shape}, expected {want} dims")
    _need(t.numel() > 0, f"{name} has shape {shape}, expected no zero-size dim")
    return shape


def _compose(a, sa, ra, b, sb, rb) -> None:
    _need(ra == rb, f"{a} {sa} and {b} {sb} do not compose: rank {ra} != {rb}")


def _scale(alpha, rank) -> float:
    return 1.0 if alpha is None or rank is None else abs(float(alpha)) / rank


def _product(names, wa, wb, t, m):
    """(shape, bound) of ``wa @ wb``, or with a Tucker core ``t`` of ``einsum("ijkl,jr,ip->prkl", t, wb, wa)``."""
    na, nb, nt = names
    what = na.rpartition("_")[0]
    _need(wa is not None and wb is not None, f"{what} is missing: neither {what} nor {na} with {nb}")
    sa, sb = _factor(na, wa, 2), _factor(nb, wb, 2)
    if t is None:
        _compose(na, sa, sa[1], nb, sb, sb[0])
        return (sa[0], sb[1]), sa[1] * m(wa) * m(wb)
    st = _factor(nt, t, 4)
    _compose(nt, st, st[0], na, sa, sa[0])
    _compose(nt, st, st[1], nb, sb, sb[0])
    return (sa[1], sb[1], *st[2:]), st[0] * st[1] * m(t) * m(wa) * m(wb)


def _lora_shape(w, m):
    """((N, K), bound) of a LoRA: ``up @ down``, a LoCon ``lora_mid`` between them."""
    up, down, alpha, mid = w[:4]
    su, sd = _factor("lora_up/B", up), _factor("lora_down/A", down)
    rank = math.prod(su[1:])
    if mid is None:
        _compose("lora_up/B", su, rank, "lora_down/A", sd, sd[0])
        return (su[0], math.prod(sd[1:])), _scale(alpha, sd[0]) * rank * m(up) * m(down)
    sm = _factor("lora_mid", mid)
    _compose("lora_up/B", su, rank, "lora_mid", sm, sm[0])
    _compose("lora_mid", sm, sm[1], "lora_down/A", sd, sd[0])
    bound = _scale(alpha, sm[0]) * rank * m(up) * sm[1] * m(mid) * m(down)
    return (su[0], math.prod(sd[1:]) * math.prod(sm[2:])), bound


def _loha_shape(w, m):
    """((N, K), bound) of a LoHa: ``(w1a @ w1b) ⊙ (w2a @ w2b)`` (Tucker cores t1/t2 together or not at all)."""
    w1a, w1b, alpha, w2a, w2b, t1, t2 = w[:7]
    _need((t1 is None) == (t2 is None), "hada_t1 and hada_t2 must come together")
    s1, b1 = _product(("hada_w1_a", "hada_w1_b", "hada_t1"), w1a, w1b, t1, m)
    s2, b2 = _product(("hada_w2_a", "hada_w2_b", "hada_t2"), w2a, w2b, t2, m)
    _need(s1 == s2, f"hada_w1 product {s1} and hada_w2 product {s2} differ in shape, expected one shape")
    return (s1[0], math.prod(s1[1:])), _scale(alpha, w1b.shape[0]) * b1 * b2


def _lokr_shape(w, m):
    """((N, K), bound) of a LoKr: ``kron(w1, w2)``, each full or ``a @ b`` (w2 also in Tucker form)."""
    w1, w2, alpha, w1a, w1b, w2a, w2b, t2 = w[:8]
    if w1 is not None:
        s1, b1 = _factor("lokr_w1", w1, 2), m(w1)
    else:
        s1, b1 = _product(("lokr_w1_a", "lokr_w1_b", None), w1a, w1b, None, m)
    if w2 is not None:
        s2, b2 = _factor("lokr_w2", w2), m(w2)
        _need(len(s2) in (2, 4), f"lokr_w2 has shape {s2}, expected 2 or 4 dims")
    else:
        s2, b2 = _product(("lokr_w2_a", "lokr_w2_b", "lokr_t2"), w2a, w2b, t2, m)
    dim = w2b.shape[0] if w2 is None else (w1b.shape[0] if w1 is None else None)
    return (s1[0] * s2[0], s1[1] * math.prod(s2[1:])), _scale(alpha, dim) * b1 * b2


_SHAPES = {"lora": _lora_shape, "loha": _loha_shape, "lokr": _lokr_shape}


def _delta_shape(adapter) -> tuple | None:
    """The 2-D ``(N, K)`` shape of an adapter's delta from its factor shapes, None for unknown adapters."""
    shape_fn = _SHAPES.get(getattr(adapter, "name", None))
    return None if shape_fn is None else tuple(int(v) for v in shape_fn(adapter.weights, lambda t: 0.0)[0])


def _on_device(adapter, device, moved=None):
    """``adapter`` with its factor tensors on ``device``, moved in their stored dtype.

    A LoRA file is loaded on the CPU; converting its factors to fp32 there and copying fp32 to the
    GPU costs twice the bytes and a CPU pass per layer (most of a LoRA load on a large model). Both
    hosts' adapters are ``cls(loaded_keys, weights)`` with the tensors in ``weights``; 0-d tensors
    (alpha) stay where they are, so reading them needs no device sync. ``moved`` (``{id(tensor): copy}``,
    kept by the caller while the tensors live) copies a tensor that several adapters hold (one
    ``lora_A`` patching q, k and v) once.
    """
    weights = getattr(adapter, "weights", None)
    if device is None or device.type == "cpu" or not isinstance(weights, tuple):
        return adapter
    moving = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.device != device for t in weights]
    if not any(moving):
        return adapter
    moved = {} if moved is None else moved
    copies = []
    for t, m in zip(weights, moving):
        if m and id(t) not in moved:
            moved[id(t)] = t.to(device, non_blocking=True)
        copies.append(moved[id(t)] if m else t)
    return type(adapter)(adapter.loaded_keys, tuple(copies))


def _identity(t) -> tuple:
    """Equal for tensors that are the same memory read the same way (a tensor without storage: itself)."""
    where = t.data_ptr() or id(t)
    return where, tuple(t.shape), t.stride(), t.dtype, t.device


def _down_key(adapter, offset):
    """``LowRankDelta.down_key`` of a LoRA adapter's full down factor: its ``lora_down`` (and ``lora_mid``)
    tensors, plus a column offset (which embeds the down in zeros); None for other adapters."""
    weights = getattr(adapter, "weights", None)
    if getattr(adapter, "name", None) != "lora" or not isinstance(weights, tuple) or len(weights) < 4:
        return None
    if not all(t is None or isinstance(t, torch.Tensor) for t in (weights[1], weights[3])):
        return None
    mid = None if weights[3] is None else _identity(weights[3])
    cols = tuple(offset) if offset is not None and offset[0] == 1 else None
    return _identity(weights[1]), mid, cols


def deltas_of(patch_list, weight, moved=None) -> list:
    """The ``LowRankDelta`` / ``DenseDelta`` list (fp32, strength applied) for one key's patches,
    computed on ``weight``'s device (``moved``: see ``_on_device``; one dict for a whole share group)."""
    out = []
    for strength, adapter, _strength_model, offset, _function in patch_list:
        if isinstance(adapter, (tuple, list)):  # ("diff", (tensor,))
            out.append(D.DenseDelta(adapter[1][0].to(weight.device).float() * strength, offset))
            continue
        key = _down_key(adapter, offset)
        adapter = _on_device(adapter, weight.device, moved)
        low = adapter.low_rank()
        if low is not None:
            up, down, scale = low
            out.append(D.LowRankDelta(up.float() * (strength * scale), down.float(), offset, key))
        else:
            out.append(D.DenseDelta(adapter.delta_weight(_target_shape(weight, offset)).float() * strength, offset))
    return out


def _module_and_name(model, key):
    path, _, param = key.rpartition(".")
    return model.get_submodule(path), path, param


def _base(backup, key, module):
    bk = backup.get(key)
    return module.weight if bk is None else bk.weight


def share_group(model, key, backup=None) -> list[tuple[str, torch.nn.Module]]:
    """``[(weight key, module)]`` of the int4 linears that share ``key``'s activation quantization
    (its siblings with an equal ``share_key`` on their original weights), ``key`` first."""
    backup = backup or {}
    module, path, _ = _module_and_name(model, key)
    base = _base(backup, key, module)
    fmt = formats.format_of(base)
    share = fmt.share_key(base)
    group = [(key, module)]
    if share is None or "." not in path:
        return group
    parent_path = path.rpartition(".")[0]
    for name, child in model.get_submodule(parent_path).named_children():
        child_key = f"{parent_path}.{name}.weight"
        if child is module or formats.format_of(getattr(child, "weight", None)) is not fmt:
            continue
        if fmt.share_key(_base(backup, child_key, child)) == share:
            group.append((child_key, child))
    return group


def group_is_patched(model, key, patches) -> bool:
    return any(k in patches for k, _ in share_group(model, key))


def is_patched(weight) -> bool:
    """Whether ``weight`` is a Parameter that ``patch_weight`` made (a LoRA is applied to it)."""
    return getattr(weight, "int4_base", None) is not None


def patch_weight(model, key, patches, backup, device_to=None) -> None:
    """Apply the patches of ``key``'s share group to its int4 weights (on ``device_to`` when given).

    Each member is rebuilt from its original (``backup`` entry, else the current weight), so applying
    twice gives the same result; every member's original goes into ``backup``. Nothing is written to
    an original tensor. When the group is already patched only the device is brought in line.
    """
    module = _module_and_name(model, key)[0]
    if is_patched(module.weight):
        if device_to is not None and module.weight.device != torch.device(device_to):
            for _, m in share_group(model, key, backup):
                m.weight = move_weight(m.weight, lambda t: t.to(device_to))
        return
    group = share_group(model, key, backup)
    bases = {k: _base(backup, k, m) for k, m in group}
    fmt = formats.format_of(bases[key])
    fn = None if device_to is None else (lambda t: t.to(device_to))
    members, moved = [], {}
    for k, m in group:
        base = bases[k]
        m.weight = base if fn is None else move_weight(base, fn)
        members.append((m, deltas_of(patches.get(k, ()), m.weight, moved)))
    try:
        fmt.apply_deltas(members)
    except BaseException:  # nothing is left half-patched, whatever stopped it (^C included); re-raised
        for k, m in group:
            m.weight = bases[k]
        raise
    for k, m in group:
        backup.setdefault(k, Backup(bases[k], False))
        m.weight.int4_base = bases[k]

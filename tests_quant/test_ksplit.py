"""Input-split (K-split) SVDQuant layers: Flux.1's single-block ``linear2`` as ONE native layer.

The layer comes from the test-side fixtures (``arch_fixtures.natural_int4("flux")`` → ``native_layers``
→ ``single_blocks.N.linear2``: tensors concatenated along K, ``"act_unsigned": [false, true]``,
``"in_splits": [256, 1024]``) and loads through ``comfy.ops.mixed_precision_ops`` like any linear.
Oracle: ``arch_fixtures.w4a4_reference`` (float64; part i quantized with its own signedness, the main
path summed over the parts, the low-rank branch once on the raw input, the bias once).

Bounds (both derived in ``reference.py``):

* kitchen's path (one plain kitchen call per part, summed in fp32 with the bias):
  ``w4a4_split_tolerance(mag, dtype, K, parts)`` = ``kernel_tolerance(mag, dtype, K)`` (what a plain
  layer is held to, summed over the parts) + (2u + (parts+1)·2⁻²⁴)·mag for the fp32 sum and its one
  rounding. In fp32 that is ~1e-4 of Σ|terms|, in bf16 ~4 %.
* the project's Triton path (each part quantized with its own signedness into one code buffer, one
  GEMM over the whole K): ``w4a4_kernel_tolerance`` on the float64 GEMM of the reference codes
  (``split_activation_codes``), which the kernel's codes equal bit for bit.

Negative control: the same tensors run as ONE signedness (either) must break each bound.
"""
from __future__ import annotations

import json

import pytest
import torch

import arch_fixtures as A
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import lora_helpers as H
from comfy.quant import kernels
from comfy.quant.deltas import output_terms
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats import format_of
from comfy.quant.formats.svdquant_w4a4 import InputSplit
from comfy.quant.layer import move_weight, run_linear_group, tie_shared_quant
from comfy.quant.packing import pack_int4
from comfy_kitchen.backends.eager import svdquant as eager_svd
from factories import prefixed
from kernel_env import DEVICE, W4A4, requires_kernels
from reference import (split_activation_codes, unit_roundoff, w4a4_gemm_reference, w4a4_kernel_tolerance,
                       w4a4_split_tolerance)

L2 = "single_blocks.0.linear2"
L1 = "single_blocks.0.linear1"
D, M = 256, 1024  # the tiny Flux's hidden and MLP widths: linear2 is (D, D + M)
K, N = D + M, D


def _layers(seed=1):
    return A.native_layers(A.natural_int4("flux", seed=seed))


def _linear2(seed=1):
    tensors, conf = _layers(seed)[L2]
    return tensors, conf


def _file(tensors, conf):
    """The layer's file entries (tensors + ``comfy_quant`` JSON), unprefixed."""
    return dict(tensors, comfy_quant=A.json_u8(conf))


def _load(tensors, conf, dtype, n=N, k=K, prefix=L2, device=None):
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=dtype).Linear(k, n, bias="bias" in tensors, device=device)
    sd = prefixed(prefix, {kk: v.to(device) if device is not None else v for kk, v in _file(tensors, conf).items()})
    missing, unexpected = [], []
    lin._load_from_state_dict(sd, prefix + ".", {}, True, missing, unexpected, [])
    assert not missing and not sd, (missing, list(sd))
    return lin


def _input(rows, dtype, seed, device="cpu"):
    """cat(attention output, GELU(mlp)): what linear2 sees; signed then non-negative-ish columns."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, D, generator=g) * 2
    a[:, ::37] *= 6  # a few outlier channels
    mlp = torch.nn.functional.gelu(torch.randn(rows, M, generator=g) * 2, approximate="tanh")
    return torch.cat([a, mlp], -1).to(dtype).to(device)


def _one_signedness(conf, unsigned):
    return {**{k: v for k, v in conf.items() if k != "in_splits"}, "act_unsigned": unsigned}


def _check(y, ref, tol, what=""):
    err = (y.double().cpu() - ref).abs()
    assert torch.isfinite(y).all() and bool((err <= tol).all()), \
        f"{what}: max err {float(err.max()):.3e}, worst err/tol {float((err / tol).max()):.3f}"


def _broken(y, ref, tol):
    return bool(((y.double().cpu() - ref).abs() > tol).any())


# ------------------------------------------------------------------------------------ loading, JSON

def test_fixture_layer_loads_as_one_split_layer():
    t, conf = _linear2()
    assert conf["act_unsigned"] == [False, True] and conf["in_splits"] == [D, M]
    lin = _load(t, conf, torch.bfloat16)
    p = lin.weight._params
    assert p.act_unsigned == InputSplit((D, M), (False, True))
    assert p.act_unsigned.runs() == ((0, D, False), (D, K, True))
    assert lin.weight._qdata.shape == (N, K // 2) and p.scale.shape == (K // 64, N)
    assert p.proj_down.shape == (K, conf["rank"]) and p.proj_up.shape == (N, conf["rank"])
    assert format_of(lin.weight).config_json(lin.weight) == {**conf, "group_size": 64}


def test_runs_merge_parts_of_one_signedness():
    assert InputSplit((64, 128, 64), (True, True, False)).runs() == ((0, 192, True), (192, 256, False))
    assert InputSplit((64, 64), (False, False)).runs() == ((0, 128, False),)


def test_a_whole_layer_kitchen_call_raises_instead_of_running_one_grid():
    t, conf = _linear2()
    lin = _load(t, conf, torch.float32)
    with pytest.raises(TypeError, match="one act_unsigned per input part"):
        torch.nn.functional.linear(_input(2, torch.float32, 0), lin.weight)
    with pytest.raises(TypeError, match="one act_unsigned per input part"):
        bool(lin.weight._params.act_unsigned)


BAD_SPLITS = {  # mutation of the fixture's JSON -> the field the error must name
    "sum_short": ({"in_splits": [D, M - 64]}, "in_splits"),
    "sum_long": ({"in_splits": [D + 64, M]}, "in_splits"),
    "not_multiple_of_64": ({"in_splits": [D - 32, M + 32]}, "in_splits"),
    "zero_part": ({"in_splits": [0, K], "act_unsigned": [False, True]}, "in_splits"),
    "negative_part": ({"in_splits": [-64, K + 64]}, "in_splits"),
    "float_width": ({"in_splits": [float(D), M]}, "in_splits"),
    "bool_width": ({"in_splits": [True, M]}, "in_splits"),
    "text_width": ({"in_splits": [str(D), M]}, "in_splits"),
    "empty": ({"in_splits": [], "act_unsigned": []}, "in_splits"),
    "not_a_list": ({"in_splits": K}, "in_splits"),
    "no_in_splits": ({"in_splits": None}, "in_splits"),
    "bool_act_unsigned": ({"act_unsigned": True}, "act_unsigned"),
    "no_act_unsigned": ({"act_unsigned": None}, "act_unsigned"),
    "short_act_unsigned": ({"act_unsigned": [False]}, "act_unsigned"),
    "long_act_unsigned": ({"act_unsigned": [False, True, True]}, "act_unsigned"),
    "int_act_unsigned": ({"act_unsigned": [0, 1]}, "act_unsigned"),
    "text_act_unsigned": ({"act_unsigned": ["false", True]}, "act_unsigned"),
    "null_act_unsigned": ({"act_unsigned": [None, True]}, "act_unsigned"),
}


@pytest.mark.parametrize("case", list(BAD_SPLITS))
def test_invalid_split_json_refused_naming_layer_and_field(case):
    change, field = BAD_SPLITS[case]
    t, conf = _linear2()
    bad = {k: v for k, v in {**conf, **change}.items() if v is not None}
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(K, N)
    sd = prefixed(L2, _file(t, bad))
    kept = set(sd)
    with pytest.raises(QuantizedLayerError) as info:
        lin._load_from_state_dict(sd, L2 + ".", {}, True, [], [], [])
    e = info.value
    assert e.layer == L2 and e.tensor == f"comfy_quant.{field}", e
    assert L2 in str(e) and field in str(e)
    assert lin.weight is None and set(sd) == kept  # nothing half-loaded, nothing consumed


def test_inspect_reports_a_split_that_does_not_sum(tmp_path):
    from comfy.quant_tools.inspect_file import inspect_checkpoint
    t, conf = _linear2()
    path = tmp_path / "bad.safetensors"
    comfy.utils.save_torch_file(prefixed(L2, _file(t, {**conf, "in_splits": [D, M - 64]})), str(path))
    problems = inspect_checkpoint(path).problems
    assert len(problems) == 1 and L2 in problems[0] and "in_splits" in problems[0], problems


def test_save_reload_bit_identical_json_and_tensors(tmp_path):
    t, conf = _linear2()
    root = torch.nn.Module()
    root.add_module("single_blocks", torch.nn.Module())
    root.single_blocks.add_module("0", torch.nn.Module())
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16)
    root.single_blocks.get_submodule("0").linear2 = ops.Linear(K, N)
    assert not root.load_state_dict(prefixed(L2, _file(t, conf)), strict=False).unexpected_keys
    saved = root.state_dict()
    assert json.loads(bytes(saved[f"{L2}.comfy_quant"].tolist())) == conf
    for key, v in t.items():  # the file's own tensors, bit for bit (bf16 compute dtype: nothing cast)
        assert saved[f"{L2}.{key}"].dtype == v.dtype and torch.equal(saved[f"{L2}.{key}"], v), key
    path = tmp_path / "linear2.safetensors"
    comfy.utils.save_torch_file(saved, str(path))
    root2 = torch.nn.Module()
    root2.add_module("single_blocks", torch.nn.Module())
    root2.single_blocks.add_module("0", torch.nn.Module())
    root2.single_blocks.get_submodule("0").linear2 = ops.Linear(K, N)
    assert not root2.load_state_dict(comfy.utils.load_torch_file(str(path)), strict=False).unexpected_keys
    again = root2.state_dict()
    assert saved.keys() == again.keys()
    for key in saved:
        assert saved[key].dtype == again[key].dtype and torch.equal(saved[key], again[key]), key
    reloaded = root2.single_blocks.get_submodule("0").linear2.weight
    assert reloaded._params.act_unsigned == InputSplit((D, M), (False, True))


def test_moves_keep_the_split():
    t, conf = _linear2()
    lin = _load(t, conf, torch.bfloat16)
    fmt = format_of(lin.weight)
    same = move_weight(lin.weight, lambda x: x.to("cpu"))
    assert same is lin.weight
    moved = move_weight(lin.weight, lambda x: x.to("meta"))
    assert moved.device.type == "meta" and moved._params.proj_down.device.type == "meta"
    assert moved._params.act_unsigned == lin.weight._params.act_unsigned
    assert fmt.config_json(moved) == fmt.config_json(lin.weight)
    assert {k: tuple(v.shape) for k, v in fmt.state_dict(moved).items()} == \
        {k: tuple(v.shape) for k, v in fmt.state_dict(lin.weight).items()}
    copy = lin.weight.to(torch.device("meta"))  # kitchen's own .to keeps the params' fields too
    assert copy._params.act_unsigned == lin.weight._params.act_unsigned


# ------------------------------------------------------------------------------------------ forward

def _kitchen_bound(t, conf, x, dtype):
    ref, mag = A.w4a4_reference(x, t, conf, dtype)
    return ref, w4a4_split_tolerance(mag, dtype, K, len(conf["in_splits"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(7, K), (2, 5, K), (1, K)])
def test_kitchen_forward_within_bound_of_float64_reference(dtype, shape):
    """Negative control: one signedness over the whole layer breaks the bound (all-signed by 200x or
    more in fp32, 6x in fp16). In bf16 kitchen's bound (8u ≈ 3 % of Σ|terms|, for operands it rounds to
    bf16) is about as wide as the all-signed mistake on these inputs, so there only all-unsigned is
    asserted; the project's kernel, whose bf16 bound is tighter, carries both controls in bf16."""
    t, conf = _linear2()
    t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
    lin = _load(t, conf, dtype)
    x = _input(torch.Size(shape[:-1]).numel(), dtype, seed=3).reshape(shape)
    with kernels.forced("kitchen"):
        y = lin(x)
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    ref, tol = _kitchen_bound(t, conf, x, dtype)
    _check(y, ref, tol, "kitchen")
    for unsigned in (False, True) if dtype != torch.bfloat16 else (True,):
        wrong, _ = A.w4a4_reference(x, t, _one_signedness(conf, unsigned), dtype)
        assert _broken(y, wrong, tol), f"one signedness ({unsigned}) within the bound"


def test_kitchen_forward_is_the_sum_of_its_parts_as_plain_layers():
    """Each part run as its own plain layer (its columns, its signedness, proj_down rows, the full
    proj_up) and the parts summed with the bias: exactly what the split layer computes (fp32 sums)."""
    dtype = torch.float32
    t, conf = _linear2(seed=2)
    lin = _load(t, conf, dtype)
    x = _input(9, dtype, seed=4)
    with kernels.forced("kitchen"):
        y = lin(x)
        acc = t["bias"].float()
        start = 0
        for width, unsigned in zip(conf["in_splits"], conf["act_unsigned"]):
            stop = start + width
            part = {"weight": t["weight"][:, start // 2:stop // 2].contiguous(),
                    "weight_scale": t["weight_scale"][start // 64:stop // 64],
                    "weight_proj_down": t["weight_proj_down"][start:stop],
                    "weight_proj_up": t["weight_proj_up"],
                    "weight_smooth_factor": t["weight_smooth_factor"][start:stop]}
            plain = _load(part, {"format": "svdquant_w4a4", "group_size": 64, "rank": conf["rank"],
                                 "act_unsigned": unsigned}, dtype, k=width, prefix="part")
            acc = acc + plain(x[:, start:stop].contiguous()).float()
            start = stop
    assert torch.equal(y, acc.to(dtype))


def test_uniform_split_is_the_plain_layer():
    """[false, false] over in_splits computes exactly what the same tensors compute as one signed layer."""
    t, conf = _linear2()
    x = _input(5, torch.float32, seed=5)
    split = _load(t, {**conf, "act_unsigned": [False, False]}, torch.float32)
    plain = _load(t, _one_signedness(conf, False), torch.float32)
    with kernels.forced("kitchen"):
        assert torch.equal(split(x), plain(x))
    assert format_of(split.weight).config_json(split.weight)["act_unsigned"] == [False, False]


class _Captured:
    """Wraps ``W4A4.quantize`` and ``W4A4.activation`` (the one-pass variant: codes, scales, low-rank input)
    for a block: counts the calls and keeps the last codes (as int8) and scales (one kernel run serves
    both the exactness check and the forward; the interpreter is slow)."""

    def __init__(self):
        self.calls, self.q, self.s = 0, None, None

    def _wrap(self, fn):
        def wrapped(*a, **k):
            self.calls += 1
            out = fn(*a, **k)
            self.q, self.s = out[0].float().to(torch.int8), out[1]  # e4m3 codes (FP8 GEMM): the same integers
            return out
        return wrapped

    def __enter__(self):
        self.orig = W4A4.quantize, W4A4.activation
        W4A4.quantize, W4A4.activation = (self._wrap(f) for f in self.orig)
        return self

    def __exit__(self, *exc):
        W4A4.quantize, W4A4.activation = self.orig


@requires_kernels
@pytest.mark.parametrize("dtype,rows", [(torch.bfloat16, 1), (torch.bfloat16, 33), (torch.float16, 7)],
                         ids=["bf16-1", "bf16-33", "fp16-7"])
def test_triton_codes_exact_and_forward_within_bound(dtype, rows):
    t, conf = _linear2()
    lin = _load(t, conf, dtype, device=DEVICE)
    x = _input(rows, dtype, seed=rows, device=DEVICE)
    with kernels.forced("triton"), _Captured() as cap:
        assert kernels.w4a4_kernel(DEVICE) is W4A4
        y = lin(x)
    assert cap.calls == 1
    q, s = cap.q, cap.s
    smooth = lin.weight._params.smooth_factor
    codes = q.view(q.shape[0], K // 64, 2, 32).permute(0, 1, 3, 2).reshape(q.shape[0], K)[:rows]
    ascales = s[:, :rows].t()
    # the integer part exactly: per part, kitchen's eager quantizer and the float64 spec
    tt = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
    ref_codes, ref_scales = split_activation_codes(x.cpu(), tt, conf["in_splits"], conf["act_unsigned"], dtype)
    assert torch.equal(codes.cpu().double(), ref_codes) and torch.equal(ascales.cpu().double(), ref_scales)
    start = 0
    for width, unsigned in zip(conf["in_splits"], conf["act_unsigned"]):
        part = x[:, start:start + width].contiguous()
        q_ref, s_ref, _ = eager_svd.quantize_svdquant_w4a4(part + 0.171875 if unsigned else part,
                                                           smooth[start:start + width],
                                                           torch.zeros(width, 1, dtype=dtype, device=DEVICE),
                                                           act_unsigned=unsigned, lora_x=part)
        assert torch.equal(pack_int4(codes[:, start:start + width]), q_ref[:rows])
        assert torch.equal(ascales[:, start // 64:(start + width) // 64].to(dtype), s_ref[:, :rows].t())
        start += width
    assert not q[rows:].any() and not s[:, rows:].any()

    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(ref_codes, ref_scales, tt, x.cpu(), tt["bias"])
    oracle, _ = A.w4a4_reference(x.cpu(), tt, conf, dtype)  # the fixtures' oracle agrees in float64
    assert ((ref - oracle).abs() <= 1e-12 * (mag_main + mag_low)).all()
    tol = w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, conf["rank"])
    _check(y, ref, tol, "triton")
    for unsigned in (False, True):  # negative control
        wrong, _ = A.w4a4_reference(x.cpu(), tt, _one_signedness(conf, unsigned), dtype)
        assert _broken(y, wrong, tol), f"one signedness ({unsigned}) within the bound"
    with kernels.forced("kitchen"):  # and kitchen's path on the same layer, within its own bound
        _check(lin(x), *_kitchen_bound(tt, conf, x.cpu(), dtype), "kitchen")


@requires_kernels
def test_triton_quantize_refuses_parts_that_do_not_cover_k():
    x = _input(3, torch.bfloat16, 0, device=DEVICE)
    smooth = torch.ones(K, dtype=torch.bfloat16, device=DEVICE)
    for parts in (((0, D, False),), ((0, D, False), (D + 64, K, True)), ((0, 32, False), (32, K, True)),
                  ((0, D, False), (D, K, True), (K, K, True))):
        with pytest.raises(ValueError, match="do not cover"):
            W4A4.quantize(x, smooth, parts)


# ----------------------------------------------------------------------------- sharing and grouping

class _Block(torch.nn.Module):
    """A Flux single block's two int4 linears (siblings, as in upstream's SingleStreamBlock)."""

    def __init__(self, dtype, device=None):
        super().__init__()
        ops = comfy.ops.mixed_precision_ops({}, compute_dtype=dtype)
        self.linear1 = ops.Linear(D, 3 * D + M, device=device)
        self.linear2 = ops.Linear(K, N, device=device)


class _DM(torch.nn.Module):
    def __init__(self, dtype, device=None, blocks=1):
        super().__init__()
        self.single_blocks = torch.nn.ModuleList([_Block(dtype, device) for _ in range(blocks)])


class _Model(torch.nn.Module):
    def __init__(self, dtype, device=None, blocks=1):
        super().__init__()
        self.diffusion_model = _DM(dtype, device, blocks)


def _model(dtype, seed=1, device=None):
    model = _Model(dtype, device)
    layers = _layers(seed)
    sd = {}
    for name in (L1, L2):
        sd.update(prefixed(name, _file(*layers[name])))
    res = model.diffusion_model.load_state_dict({k: v.to(device) if device else v for k, v in sd.items()},
                                                strict=False)
    assert not res.unexpected_keys and not res.missing_keys, res
    return model


def test_share_key_and_ties():
    model = _model(torch.float32)
    block = model.diffusion_model.single_blocks[0]
    fmt = format_of(block.linear2.weight)
    k1, k2 = fmt.share_key(block.linear1.weight), fmt.share_key(block.linear2.weight)
    assert k1 != k2 and isinstance(k2[-1], InputSplit)
    assert tie_shared_quant(model) == 0  # linear1 and linear2 are siblings that share nothing
    # the same tensors as a single-signedness layer never share with the split one
    t, conf = _linear2()
    plain = _load(t, _one_signedness(conf, False), torch.float32)
    split = _load(t, conf, torch.float32)
    assert not fmt.can_tie([plain.weight, split.weight]) and not fmt.can_tie([split.weight, plain.weight])
    other = _load(t, {**conf, "act_unsigned": [True, False]}, torch.float32)
    assert not fmt.can_tie([split.weight, other.weight])
    assert fmt.can_tie([split.weight, _load(t, conf, torch.float32).weight])


def _twin_pair(dtype, device=None):
    """Two identically split layers with equal smoothing and proj_down (other codes): they may share."""
    t, conf = _linear2(seed=1)
    t2, _ = _linear2(seed=3)
    t2 = dict(t2, weight_smooth_factor=t["weight_smooth_factor"].clone(),
              weight_proj_down=t["weight_proj_down"].clone())
    parent = torch.nn.Module()
    parent.a = _load(t, conf, dtype, device=device)
    parent.b = _load(t2, conf, dtype, device=device)
    assert tie_shared_quant(parent) == 1
    assert parent.a.weight._params.proj_down is parent.b.weight._params.proj_down
    assert parent.b.weight._params.act_unsigned == InputSplit((D, M), (False, True))
    fmt = format_of(parent.a.weight)
    assert fmt.share_key(parent.a.weight) == fmt.share_key(parent.b.weight)
    return parent, (t, t2), conf


def test_grouped_forward_of_identical_splits_kitchen():
    parent, _, _ = _twin_pair(torch.float32)
    x = _input(4, torch.float32, seed=6)
    mods = (parent.a, parent.b)
    with kernels.forced("kitchen"):
        separate = [m(x) for m in mods]
        grouped = run_linear_group(x, mods)
    for a, b in zip(separate, grouped):
        assert torch.equal(a, b)


@requires_kernels
def test_grouped_forward_of_identical_splits_triton():
    """The project's kernel quantizes the shared split activation once for both layers; each output is
    within the kernel bound of its own float64 GEMM on the reference codes."""
    dtype = torch.bfloat16
    parent, ts, conf = _twin_pair(dtype, device=DEVICE)
    x = _input(5, dtype, seed=7, device=DEVICE)
    with kernels.forced("triton"), _Captured() as cap:
        grouped = run_linear_group(x, (parent.a, parent.b))
    assert cap.calls == 1
    codes, scales = split_activation_codes(x.cpu(), ts[0], conf["in_splits"], conf["act_unsigned"], dtype)
    for t, y in zip(ts, grouped):
        ref, mm, ml, mla = w4a4_gemm_reference(codes, scales, t, x.cpu(), t["bias"])
        _check(y, ref, w4a4_kernel_tolerance(ref, mm, ml, mla, dtype, K, conf["rank"]), "grouped")


# --------------------------------------------------------------------------------------------- LoRA

def _lora(r=4, seed=50):
    up, down = H.factors(N, K, r, seed)
    return up, down, H.lora_sd("comfy", L2, up, down, alpha=r / 2)  # s = alpha / r = 0.5, exact


def test_lora_appended_exactly_kitchen_and_unpatch_bit_exact():
    """fp32, kitchen's path. The LoRA lands as 4 more ranks of the one low-rank branch (no output term,
    the split kept); y_patched − y_unpatched is s·(x Aᵀ)Bᵀ within ``lora_helpers.delta_tolerance`` plus
    2u·(Σ|base terms| + Σ|delta terms|) for the per-part output roundings (each part's low-rank term is
    rounded with its main path, in both outputs); the float64 reference of the patched tensors differs
    from the unpatched one by exactly that delta; unpatching restores the very Parameter and every bit."""
    dtype = torch.float32
    model = _model(dtype)
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    lin = model.diffusion_model.single_blocks[0].linear2
    original = lin.weight
    t0 = {k: v.clone() for k, v in lin.state_dict().items()}
    conf = json.loads(bytes(t0.pop("comfy_quant").tolist()))
    x = _input(6, dtype, seed=8)
    with kernels.forced("kitchen"):
        y0 = lin(x)
    ref0, mag0 = A.w4a4_reference(x, t0, conf, dtype)
    up, down, lora = _lora()
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert list(patched.patches) == [f"diffusion_model.{L2}.weight"]
    rank0 = original._params.proj_down.shape[1]
    patched.patch_model()
    p = lin.weight._params
    assert p.proj_down.shape == (K, rank0 + 4) and p.proj_up.shape == (N, rank0 + 4)
    assert p.act_unsigned == original._params.act_unsigned and not output_terms(lin.weight)
    assert p.smooth_factor is original._params.smooth_factor and lin.weight._qdata is original._qdata
    with kernels.forced("kitchen"):
        y1 = lin(x)
    exp, mag_d = H.lowrank_delta(x, up, down, 0.5)
    t1 = {k: v for k, v in lin.state_dict().items() if k != "comfy_quant"}
    ref1, _ = A.w4a4_reference(x, t1, {**conf, "rank": rank0 + 4}, dtype)
    assert ((ref1 - ref0 - exp).abs() <= 1e-12 * (mag0 + mag_d)).all()  # appended exactly (float64)
    u = unit_roundoff(dtype)
    tol = H.delta_tolerance(y1, y0, mag0, mag_d, dtype, K) + 2 * u * (mag0 + mag_d)
    H.assert_delta(y1.double() - y0.double(), exp, tol, what="linear2 LoRA")
    patched.unpatch_model()
    assert lin.weight is original
    with kernels.forced("kitchen"):
        assert torch.equal(lin(x), y0)
    after = {k: v for k, v in lin.state_dict().items() if k != "comfy_quant"}
    assert all(torch.equal(t0[k], after[k]) and t0[k].dtype == after[k].dtype for k in t0)


@requires_kernels
def test_lora_on_the_triton_path_and_unpatch_bit_exact():
    """bf16, the project's kernel: the patched layer is within the kernel bound of the float64 GEMM of
    the patched tensors (its activation codes are unchanged by a LoRA), and unpatching gives back the
    unpatched output bit for bit."""
    dtype = torch.bfloat16
    model = _model(dtype, device=DEVICE)
    mp = comfy.model_patcher.ModelPatcher(model, DEVICE, DEVICE)
    lin = model.diffusion_model.single_blocks[0].linear2
    original = lin.weight
    conf = format_of(original).config_json(original)
    x = _input(9, dtype, seed=9, device=DEVICE)
    with kernels.forced("triton"):
        y0 = lin(x)
    up, down, lora = _lora(seed=51)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    patched.patch_model()
    assert lin.weight._params.proj_down.shape[1] == conf["rank"] + 4 and not output_terms(lin.weight)
    with kernels.forced("triton"):
        y1 = lin(x)
    t1 = {k: v.cpu() for k, v in lin.state_dict().items() if k != "comfy_quant"}
    codes, scales = split_activation_codes(x.cpu(), t1, conf["in_splits"], conf["act_unsigned"], dtype)
    ref, mm, ml, mla = w4a4_gemm_reference(codes, scales, t1, x.cpu(), t1["bias"])
    _check(y1, ref, w4a4_kernel_tolerance(ref, mm, ml, mla, dtype, K, conf["rank"] + 4), "triton LoRA")
    patched.unpatch_model()
    assert lin.weight is original
    with kernels.forced("triton"):
        y2 = lin(x)
    assert torch.equal(y2, y0)


def test_inspect_reports_a_flux_native_file_with_its_split(tmp_path):
    """``inspect`` of a native Flux file: no problems, and linear2's signedness shown per input segment."""
    from comfy.quant_tools.inspect_file import format_report, inspect_checkpoint
    sd, meta = A.to_native(A.natural_int4("flux", seed=2))
    path = tmp_path / "flux.safetensors"
    comfy.utils.save_torch_file(sd, path, metadata=meta)
    report = inspect_checkpoint(path)
    assert not report.problems, report.problems
    lines = [line for line in format_report(report).splitlines() if "single_blocks.0.linear2 " in line]
    assert len(lines) == 1 and " no/yes " in lines[0], lines

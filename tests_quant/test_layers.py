"""Foundation: int4 linears load, run and save through MixedPrecisionOps.Linear.

Tolerances: ``reference.kernel_tolerance`` bounds the rounding a kernel computing in the compute
dtype may add to the float64 reference (derivation in its docstring). In fp32 that bound is ~3e-5 of
Σ|terms|, far below one activation-code step (~1e-3 of Σ|terms| at K=256), so a wrong code, a
missing shift or a missing branch fails; in bf16 it is ~3% of Σ|terms|.
"""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import comfy.ops
import comfy.quant_ops
import comfy.utils
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.layer import run_linear_group, tie_shared_quant
from factories import awq_tensors, prefixed, svdquant_tensors
from reference import awq_forward, kernel_tolerance, svdquant_forward

N, K, R = 128, 256, 16


def make_linear(tensors, prefix="blocks.0.lin", n=N, k=K, dtype=torch.float32, bias=True):
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=dtype)
    root = torch.nn.Module()
    parent = root
    parts = prefix.split(".")
    for p in parts[:-1]:
        child = torch.nn.Module()
        parent.add_module(p, child)
        parent = child
    lin = ops.Linear(k, n, bias=bias)
    parent.add_module(parts[-1], lin)
    result = root.load_state_dict(prefixed(prefix, tensors), strict=False)
    assert not result.unexpected_keys, result
    return root, lin


def check_close(y, ref, mag, dtype, k=K):
    assert y.shape == ref.shape
    err = (y.double() - ref).abs()
    tol = kernel_tolerance(mag, dtype, k)
    assert bool((err <= tol).all()), f"max err {float(err.max()):.3e}, worst err/tol {float((err / tol).max()):.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_unsigned", [False, True])
@pytest.mark.parametrize("shape", [(7, K), (2, 5, K)])
def test_svdquant_forward_matches_reference(dtype, act_unsigned, shape):
    t = svdquant_tensors(N, K, R, seed=1, act_unsigned=act_unsigned)
    _, lin = make_linear(t, dtype=dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    if act_unsigned:  # the post-GELU input these layers see
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x = x.to(dtype)
    ref, mag = svdquant_forward(x, t, act_unsigned, t["bias"], dtype)
    check_close(lin(x), ref, mag, dtype)


def test_svdquant_unsigned_shift_matters():
    # the same tensors run as signed give a clearly different result: the test above can fail
    t = svdquant_tensors(N, K, R, seed=1, act_unsigned=True)
    _, lin = make_linear(t)
    x = torch.nn.functional.gelu(torch.randn(4, K), approximate="tanh")
    ref_signed, mag = svdquant_forward(x, t, False, t["bias"], torch.float32)
    err = (lin(x).double() - ref_signed).abs()
    assert float((err / kernel_tolerance(mag, torch.float32, K)).max()) > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, K), (2, 3, K)])
@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_forward_matches_reference(dtype, shape, group_size):
    t = awq_tensors(384, K, group_size=group_size, seed=2)
    _, lin = make_linear(t, n=384, dtype=dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref, mag = awq_forward(x, t, group_size, t["bias"])
    check_close(lin(x), ref, mag, dtype)


def test_side_tensors_cast_to_compute_dtype_and_no_dequantize_on_forward(monkeypatch):
    t = svdquant_tensors(N, K, R, dtype=torch.float16)
    _, lin = make_linear(t, dtype=torch.bfloat16)
    p = lin.weight._params
    assert {p.scale.dtype, p.proj_down.dtype, p.proj_up.dtype, p.smooth_factor.dtype, lin.bias.dtype} == {torch.bfloat16}
    layout = comfy.quant_ops.get_layout_class("TensorCoreSVDQuantW4A4Layout")

    def forbidden(*a, **k):
        raise AssertionError("dequantize on the forward path")

    monkeypatch.setattr(layout, "dequantize", forbidden)
    lin(torch.randn(3, K, dtype=torch.float32))  # float32 input is cast, not rejected


def test_key_spellings_load_identically_and_save_canonical():
    t = svdquant_tensors(N, K, R, seed=5)
    alt = dict(t)
    for canon, other in (("weight_proj_down", "proj_down"), ("weight_proj_up", "proj_up"),
                         ("weight_smooth_factor", "smooth_factor")):
        alt[other] = alt.pop(canon)
    x = torch.randn(3, K)
    root_a, a = make_linear(t)
    root_b, b = make_linear(alt)
    assert torch.equal(a(x), b(x))
    assert set(root_b.state_dict()) == set(root_a.state_dict())
    assert "blocks.0.lin.weight_proj_down" in root_b.state_dict()

    awq = awq_tensors(N, K, seed=6)
    awq_alt = dict(awq)
    awq_alt["weight_zero"] = awq_alt.pop("weight_zeros")
    root_c, c = make_linear(awq)
    root_d, d = make_linear(awq_alt)
    assert torch.equal(c(x), d(x))
    assert "blocks.0.lin.weight_zeros" in root_d.state_dict()


def test_both_spellings_present_is_an_error():
    t = svdquant_tensors(N, K, R)
    t["proj_down"] = t["weight_proj_down"].clone()
    with pytest.raises(QuantizedLayerError, match=r"blocks\.0\.lin.*weight_proj_down.*both"):
        make_linear(t)


@pytest.mark.parametrize("make", [lambda: svdquant_tensors(N, K, R, seed=7),
                                  lambda: awq_tensors(N, K, seed=7)])
def test_round_trip_is_bit_identical(tmp_path, make):
    """save → load gives back every tensor bit for bit (same keys and dtypes). The two layers' outputs
    are each checked against the float64 reference instead of against each other: lin2's fp32 tensors
    are views into the file buffer at its data offsets (not 64-byte aligned), lin's are fresh bf16 → fp32
    copies, and a BLAS may sum the same operands in another order at another alignment (the low-rank
    matmuls read proj_down / proj_up directly), which ``kernel_tolerance`` covers and equality does not."""
    t = make()
    root, lin = make_linear(t)
    path = tmp_path / "layer.safetensors"
    comfy.utils.save_torch_file(root.state_dict(), path)
    sd = comfy.utils.load_torch_file(path)
    root2 = torch.nn.Module()
    root2.blocks = torch.nn.Module()
    root2.blocks.add_module("0", torch.nn.Module())
    lin2 = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(K, N)
    root2.blocks.get_submodule("0").lin = lin2
    assert not root2.load_state_dict(sd, strict=False).unexpected_keys
    x = torch.randn(2, 3, K)
    if "weight_zeros" in t:
        ref, mag = awq_forward(x, t, 64, t["bias"])
    else:
        ref, mag = svdquant_forward(x, t, False, t["bias"], torch.float32)
    check_close(lin(x), ref, mag, torch.float32)
    check_close(lin2(x), ref, mag, torch.float32)
    saved = {k: v for k, v in root.state_dict().items()}
    again = root2.state_dict()
    assert saved.keys() == again.keys()
    for k in saved:
        assert saved[k].dtype == again[k].dtype and torch.equal(saved[k], again[k]), k


def test_file_level_metadata_equals_per_layer():
    t = svdquant_tensors(N, K, R, seed=8, act_unsigned=True)
    conf = json.loads(bytes(t.pop("comfy_quant").tolist()))
    sd = prefixed("blocks.0.lin", t)
    header = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"blocks.0.lin": conf}})}
    sd, meta = comfy.utils.convert_old_quants(sd, metadata=header)
    assert "_quantization_metadata" not in meta
    assert comfy.utils.detect_layer_quantization(sd) == {"mixed_ops": True}
    root = torch.nn.Module()
    root.blocks = torch.nn.Module()
    root.blocks.add_module("0", torch.nn.Module())
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(K, N)
    root.blocks.get_submodule("0").lin = lin
    root.load_state_dict(sd, strict=False)
    _, per_layer = make_linear(svdquant_tensors(N, K, R, seed=8, act_unsigned=True))
    x = torch.randn(3, K)
    assert lin.weight._params.act_unsigned is True
    assert torch.equal(lin(x), per_layer(x))


def test_file_level_metadata_errors():
    with pytest.raises(ValueError, match="_quantization_metadata"):
        comfy.utils.convert_old_quants({}, metadata={"_quantization_metadata": "{not json"})
    with pytest.raises(ValueError, match="layers"):
        comfy.utils.convert_old_quants({}, metadata={"_quantization_metadata": json.dumps({"x": 1})})
    assert comfy.utils.detect_layer_quantization({"a.weight": torch.zeros(1)}) is None


def test_plain_layers_load_as_compute_dtype():
    root, lin = make_linear({"weight": torch.randn(N, K, dtype=torch.float16), "bias": torch.randn(N)},
                            dtype=torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16 and not isinstance(lin.weight, comfy.quant_ops.QuantizedTensor)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert set(root.state_dict()) == {"blocks.0.lin.weight", "blocks.0.lin.bias"}


def _bad(mutate, fmt="svd"):
    t = svdquant_tensors(N, K, R) if fmt == "svd" else awq_tensors(N, K)
    mutate(t)
    return t


@pytest.mark.parametrize("mutate,tensor,expected", [
    (lambda t: t.pop("weight_proj_up"), "weight_proj_up", "nothing"),
    (lambda t: t.update(weight=t["weight"][:, :-1]), "weight", r"\(128, 128\).*\(128, 127\)"),
    (lambda t: t.update(weight_scale=t["weight_scale"].t()), "weight_scale", r"\(4, 128\)"),
    (lambda t: t.update(weight_proj_up=t["weight_proj_up"][:, :8]), "weight_proj_up", r"\(128, 16\)"),
    (lambda t: t.update(weight_smooth_factor=t["weight_smooth_factor"][:-2]), "weight_smooth_factor", r"\(256,\)"),
    (lambda t: t.update(weight=t["weight"].to(torch.int32)), "weight", "int8"),
    (lambda t: t.update(weight_scale=t["weight_scale"].to(torch.int8)), "weight_scale", "float"),
    (lambda t: t.update(bias=t["bias"][:5]), "bias", r"\(128,\)"),
    (lambda t: t.update(comfy_quant=torch.tensor(list(b"{nope"), dtype=torch.uint8)), "comfy_quant", "JSON"),
    (lambda t: t.update(comfy_quant=torch.tensor(list(b'{"rank": 4}'), dtype=torch.uint8)), "comfy_quant", "format"),
    (lambda t: t.update(comfy_quant=torch.tensor(list(b'{"format": "svdquant_w4a4", "act_unsigned": "yes"}'),
                                                 dtype=torch.uint8)), "act_unsigned", "true or false"),
    (lambda t: t.update(comfy_quant=torch.tensor(list(b'{"format": "svdquant_w4a4", "rank": 32}'),
                                                 dtype=torch.uint8)), "weight_proj_down", r"\(256, 32\)"),
])
def test_malformed_svdquant_names_layer_tensor_expected_and_got(mutate, tensor, expected):
    t = _bad(mutate)
    kept = dict(prefixed("blocks.0.lin", t))
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32)
    lin = ops.Linear(K, N)
    sd = dict(kept)
    with pytest.raises(ValueError, match=rf"blocks\.0\.lin.*{tensor}.*{expected}"):
        lin._load_from_state_dict(sd, "blocks.0.lin.", {}, True, [], [], [])
    assert lin.weight is None  # nothing half-loaded
    assert sd.keys() == kept.keys()  # and nothing consumed


@pytest.mark.parametrize("mutate,tensor", [
    (lambda t: t.pop("weight_zeros"), "weight_zeros"),
    (lambda t: t.update(weight_zeros=t["weight_zeros"][:2]), "weight_zeros"),
    (lambda t: t.update(comfy_quant=torch.tensor(list(b'{"format": "awq_w4a16", "group_size": 96}'),
                                                 dtype=torch.uint8)), "weight"),
])
def test_malformed_awq(mutate, tensor):
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(K, N)
    with pytest.raises(ValueError, match=rf"blocks\.0\.lin.*{tensor}"):
        lin._load_from_state_dict(prefixed("blocks.0.lin", _bad(mutate, "awq")), "blocks.0.lin.", {}, True, [], [], [])


def test_unknown_format_lists_supported():
    t = svdquant_tensors(N, K, R)
    t["comfy_quant"] = torch.tensor(list(b'{"format": "int3_magic"}'), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"blocks\.0\.lin.*awq_w4a16.*svdquant_w4a4.*int3_magic"):
        make_linear(t)


def _conf(**kw):
    return torch.tensor(list(json.dumps({"format": "svdquant_w4a4", **kw}).encode()), dtype=torch.uint8)


def test_act_unsigned_guess_only_when_absent(caplog):
    t = svdquant_tensors(N, K, R)
    t["comfy_quant"] = _conf(act_unsigned=False)
    _, lin = make_linear(t, prefix="transformer_blocks.0.img_mlp.net.2")
    assert lin.weight._params.act_unsigned is False

    t["comfy_quant"] = _conf()
    with caplog.at_level(logging.INFO):
        _, lin = make_linear(t, prefix="transformer_blocks.0.txt_mlp.net.2")
    assert lin.weight._params.act_unsigned is True
    assert any("act_unsigned" in r.message and "txt_mlp.net.2" in r.message for r in caplog.records)

    _, lin = make_linear(t, prefix="transformer_blocks.0.img_mlp.net.0.proj")
    assert lin.weight._params.act_unsigned is False


def test_state_dict_json_describes_the_layer():
    root, _ = make_linear(svdquant_tensors(N, K, R, act_unsigned=True))
    conf = json.loads(bytes(root.state_dict()["blocks.0.lin.comfy_quant"].tolist()))
    assert conf == {"format": "svdquant_w4a4", "group_size": 64, "rank": R, "act_unsigned": True}


def test_quant_algos_and_layouts():
    for name in ("svdquant_w4a4", "awq_w4a16"):
        algo = comfy.quant_ops.QUANT_ALGOS[name]
        assert algo["quantize_input"] is False and algo["storage_t"] == torch.int8
        assert comfy.quant_ops.get_layout_class(algo["comfy_tensor_layout"]).__name__ == algo["comfy_tensor_layout"]
    with pytest.raises(ValueError, match="not available"):
        comfy.quant_ops.get_layout_class("NoSuchLayout")


def test_grouped_qkv_forward_equals_separate():
    shared = svdquant_tensors(N, K, R, seed=9)
    root = torch.nn.Module()
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32)
    root.attn = torch.nn.Module()
    sd = {}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        root.attn.add_module(name, ops.Linear(K, N))
        t = svdquant_tensors(N, K, R, seed=20 + i)
        for key in ("weight_smooth_factor", "weight_proj_down"):
            t[key] = shared[key].clone()  # equal values, separate storage, as in a file
        sd.update(prefixed(f"attn.{name}", t))
    root.load_state_dict(sd, strict=False)
    mods = (root.attn.to_q, root.attn.to_k, root.attn.to_v)
    x = torch.randn(2, 3, K)
    separate = [m(x) for m in mods]
    assert tie_shared_quant(root) == 1
    assert mods[0].weight._params.proj_down is mods[2].weight._params.proj_down
    calls = []
    import comfy_kitchen
    orig = comfy_kitchen.quantize_svdquant_w4a4
    try:
        comfy_kitchen.quantize_svdquant_w4a4 = lambda *a, **k: calls.append(1) or orig(*a, **k)
        grouped = run_linear_group(x, mods)
    finally:
        comfy_kitchen.quantize_svdquant_w4a4 = orig
    assert len(calls) == 1  # one activation quantization for three projections
    for a, b in zip(separate, grouped):
        assert torch.equal(a, b)


def _run_isolated(code):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [repo, os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_kitchen_import_failure_leaves_module_importable():
    r = _run_isolated(
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name.startswith('comfy_kitchen'): raise RuntimeError('broken kitchen build')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "import comfy.quant_ops as q, comfy.ops, comfy.utils\n"
        "print('ALGOS', sorted(q.QUANT_ALGOS))\n")
    assert r.returncode == 0, r.stderr
    assert "ALGOS []" in r.stdout
    assert "broken kitchen build" in r.stderr and "unavailable" in r.stderr


def test_kitchen_missing_one_layout_disables_only_that_one():
    r = _run_isolated(
        "import comfy_kitchen.tensor as t\n"
        "del t.TensorCoreAWQW4A16Layout\n"
        "import comfy.quant_ops as q, torch, comfy.ops\n"
        "from factories import awq_tensors\n"
        "print('ALGOS', sorted(q.QUANT_ALGOS))\n"
        "lin = comfy.ops.mixed_precision_ops({}, torch.float32).Linear(256, 128)\n"
        "try:\n"
        "    lin._load_from_state_dict({'l.' + k: v for k, v in awq_tensors(128, 256).items()}, 'l.', {}, True, [], [], [])\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n")
    assert r.returncode == 0, r.stderr
    assert "ALGOS ['svdquant_w4a4']" in r.stdout
    assert "ERR" in r.stdout and "awq_w4a16" in r.stdout and "unavailable" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("act_unsigned", [False, True])
def test_cuda_forward_matches_reference(act_unsigned):
    t = svdquant_tensors(N, K, R, seed=11, act_unsigned=act_unsigned)
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16)
    lin = ops.Linear(K, N, device="cuda")
    lin._load_from_state_dict(prefixed("l", t), "l.", {}, True, [], [], [])
    x = torch.randn(300, K)
    if act_unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x = x.to(torch.bfloat16)
    ref, mag = svdquant_forward(x, t, act_unsigned, t["bias"], torch.bfloat16)
    check_close(lin(x.cuda()).cpu(), ref, mag, torch.bfloat16)
    awq = awq_tensors(N, K, seed=12)
    lin = ops.Linear(K, N, device="cuda")
    lin._load_from_state_dict(prefixed("l", awq), "l.", {}, True, [], [], [])
    for m in (1, 16, 300):
        xa = torch.randn(m, K).to(torch.bfloat16)
        ref, mag = awq_forward(xa, awq, 64, awq["bias"])
        check_close(lin(xa.cuda()).cpu(), ref, mag, torch.bfloat16)


def _tied_pair(seed):
    root = torch.nn.Module()
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32)
    root.attn = torch.nn.Module()
    shared = svdquant_tensors(N, K, R, seed=seed)
    sd = {}
    for i, name in enumerate(("to_q", "to_k")):
        root.attn.add_module(name, ops.Linear(K, N))
        t = svdquant_tensors(N, K, R, seed=seed + 1 + i)
        t["weight_smooth_factor"], t["weight_proj_down"] = shared["weight_smooth_factor"], shared["weight_proj_down"]
        sd.update(prefixed(f"attn.{name}", t))
    root.load_state_dict(sd, strict=False)
    tie_shared_quant(root)
    return root, (root.attn.to_q, root.attn.to_k)


def _bypass(m):
    original = m.forward
    m.forward = lambda x: original(x) + 1.0  # what upstream's bypass LoRA does: module.forward = f(x) + h(x)


def _hook(m):
    m.register_forward_hook(lambda mod, args, out: out * 2.0)


def _weight_function(m):
    m.weight_function = [lambda w: w]  # upstream's low-VRAM LoRA / weight wrappers


@pytest.mark.parametrize("change", [_bypass, _hook, _weight_function])
def test_grouped_forward_respects_what_changes_a_module_call(change):
    """A bypass adapter, a forward hook or a weight function on one member: the group runs module by module."""
    root, mods = _tied_pair(30)
    x = torch.randn(3, K)
    change(mods[1])
    separate = [m(x) for m in mods]
    grouped = run_linear_group(x, mods)
    plain = mods[1].forward.__func__(mods[1], x) if hasattr(mods[1].forward, "__func__") else None
    for a, b in zip(separate, grouped):
        assert torch.equal(a, b)
    if plain is not None:  # hook / weight function: the changed call differs from the bare forward
        assert change is _weight_function or not torch.equal(grouped[1], plain)


def test_moves_keep_ties_one_model_move_or_module_by_module():
    """Shared side tensors get one copy per device, whether the model or each module is moved."""
    from comfy.quant.layer import move_weight

    _, mods = _tied_pair(40)
    to_meta = lambda t: t.to("meta")  # noqa: E731  (a real second device without a GPU)
    moved = [move_weight(m.weight, to_meta) for m in mods]  # two separate moves, as ComfyUI's loader does
    p0, p1 = moved[0]._params, moved[1]._params
    assert p0.proj_down.device.type == "meta"
    assert p0.proj_down is p1.proj_down and p0.smooth_factor is p1.smooth_factor
    assert p0.proj_up is not p1.proj_up  # per-layer tensors stay per layer
    assert moved[0]._qdata.shape == mods[0].weight._qdata.shape

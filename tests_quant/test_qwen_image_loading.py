"""Qwen-Image through the stock loading path, the offline quantizer, inspect and the demo."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import comfy.model_detection
import comfy.nodes
import comfy.ops
import comfy.sd
import comfy.utils
from factories import partial_files
from comfy.quant import kitchen
from comfy.quant_tools.demo import DemoConfig, agreement, demo_inputs, synthetic_state_dict
from comfy.quant_tools.inspect_file import inspect_checkpoint
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
from comfy.quant_tools.quantizer import (BLOCK, JOINT_MEMBERS, QuantizeOptions, quantize_awq, quantize_file,
                                   quantize_state_dict, quantize_svdquant, record_activation_stats)
from reference import (UNSIGNED_SHIFT, awq_weight, kernel_tolerance, quantize_activation, svdquant_forward,
                       svdquant_residual, unpack_nibbles)

CFG = DemoConfig(num_layers=2, latent_size=16, text_tokens=8)
FP32 = {"dtype": torch.float32}


@pytest.fixture(scope="module")
def float_sd():
    return synthetic_state_dict(CFG)


@pytest.fixture(scope="module")
def int4_file(tmp_path_factory, float_sd):
    d = tmp_path_factory.mktemp("int4")
    src, dst = d / "bf16.safetensors", d / "int4.safetensors"
    comfy.utils.save_torch_file(float_sd, src)
    quantize_file(src, dst, QuantizeOptions(rank=16), progress=False)
    return src, dst


def load(path, **options):
    return comfy.sd.load_diffusion_model(str(path), model_options={**FP32, **options})


def run(patcher, inputs):
    with torch.no_grad():
        return patcher.model.diffusion_model(*inputs)


# ---- detection ----

def test_detection_derives_every_width_from_unquantized_tensors(float_sd):
    conf = comfy.model_detection.detect_unet_config(float_sd, "")
    assert conf == {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
                    "attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 256,
                    "axes_dims_rope": (16, 56, 56)}
    quantized, _ = quantize_state_dict(dict(float_sd), QuantizeOptions(rank=8), progress=False)
    assert comfy.model_detection.detect_unet_config(quantized, "") == conf


def test_detection_variants(float_sd):
    sd = {"diffusion_model." + k: v for k, v in float_sd.items()}
    assert comfy.model_detection.unet_prefix_from_state_dict(sd) == "diffusion_model."
    edit = dict(float_sd, __index_timestep_zero__=torch.tensor([]))
    edit["time_text_embed.addition_t_embedding.weight"] = torch.zeros(2, 256)
    conf = comfy.model_detection.detect_unet_config(edit, "")
    assert conf["default_ref_method"] == "index_timestep_zero" and conf["use_additional_t_cond"] is True
    assert comfy.model_detection.detect_unet_config({"foo.weight": torch.zeros(1)}, "") is None
    assert comfy.model_detection.default_axes_dims_rope(32) == (4, 14, 14)
    with pytest.raises(ValueError, match="not a supported|could not detect"):
        comfy.sd.load_diffusion_model_state_dict({"foo.weight": torch.zeros(1)})


# ---- loader ----

def test_loader_picks_mixed_ops_only_for_quantized_files(int4_file):
    src, dst = int4_file
    float_model = load(src).model.diffusion_model
    int4_model = load(dst).model.diffusion_model
    assert "MixedPrecisionOps" not in type(float_model.transformer_blocks[0].attn.to_q).__qualname__
    assert "MixedPrecisionOps" in type(int4_model.transformer_blocks[0].attn.to_q).__qualname__
    blk = int4_model.transformer_blocks[0]
    for layer in (blk.attn.to_q, blk.img_mlp.net[2], blk.img_mod[1]):
        assert isinstance(layer.weight, kitchen.QuantizedTensor)
    assert not isinstance(int4_model.img_in.weight, kitchen.QuantizedTensor)
    assert int4_model.img_in.weight.dtype == torch.float32


def test_unetloader_node_interface(int4_file, monkeypatch):
    src, dst = int4_file
    assert comfy.nodes.UNETLoader.RETURN_TYPES == ("MODEL",) and comfy.nodes.UNETLoader.FUNCTION == "load_unet"
    monkeypatch.setenv("COMFYUI_MODELS_DIR", str(dst.parent.parent))
    os.makedirs(dst.parent.parent / "diffusion_models", exist_ok=True)
    link = dst.parent.parent / "diffusion_models" / "tiny_int4.safetensors"
    if not link.exists():
        link.symlink_to(dst)
    assert "tiny_int4.safetensors" in comfy.nodes.UNETLoader.INPUT_TYPES()["required"]["unet_name"][0]
    patcher = comfy.nodes.UNETLoader().load_unet("tiny_int4.safetensors", "fp32")[0]
    assert isinstance(patcher.model.diffusion_model.transformer_blocks[0].attn.to_q.weight, kitchen.QuantizedTensor)


def test_quantized_model_agrees_with_bf16_model(int4_file):
    """Bound: cosine ≥ 0.97 and PSNR ≥ 20 dB on this seeded model (measured 0.98 / 24 dB with the demo's
    4 blocks): 4-bit weights and activations on random-like weights lose ~2% of the signal energy."""
    src, dst = int4_file
    inputs = demo_inputs(CFG)
    cos, psnr = agreement(run(load(dst), inputs), run(load(src), inputs))
    assert cos >= 0.97 and psnr >= 20, (cos, psnr)


def test_calibration_is_used_and_helps_on_outlier_inputs(float_sd):
    float_model = load_state(float_sd)
    inputs = demo_inputs(CFG)
    calib = record_activation_stats(float_model.model.diffusion_model, lambda: run(float_model, inputs))
    assert "transformer_blocks.0.attn.to_q" in calib and calib["transformer_blocks.0.attn.to_q"].shape == (256,)
    q_cal, _ = quantize_state_dict(dict(float_sd), QuantizeOptions(rank=16), calibration=calib, progress=False)
    q_plain, _ = quantize_state_dict(dict(float_sd), QuantizeOptions(rank=16), progress=False)
    key = "transformer_blocks.0.attn.to_q.weight_smooth_factor"
    assert torch.all(q_plain[key] == 1) and not torch.all(q_cal[key] == 1)


def load_state(sd, metadata=None):
    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=FP32, metadata=metadata)


def test_layer_inside_full_model_equals_layer_reference(int4_file):
    _, dst = int4_file
    stored = comfy.utils.load_torch_file(str(dst))
    model = load(dst).model.diffusion_model
    blk = model.transformer_blocks[1]
    seen = {}
    blk.img_mlp.net[2].register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0], mlp_out=out))
    blk.attn.register_forward_pre_hook(lambda m, a, kw: seen.update(attn_in=kw["hidden_states"]), with_kwargs=True)
    run_inputs = demo_inputs(CFG)
    with torch.no_grad():
        model(*run_inputs)
        qkv = comfy.ops.run_linear_group(seen["attn_in"], (blk.attn.to_q, blk.attn.to_k, blk.attn.to_v))

    def tensors(layer):
        p = f"transformer_blocks.1.{layer}."
        return {k[len(p):]: v for k, v in stored.items() if k.startswith(p)}

    t = tensors("img_mlp.net.2")
    ref, mag = svdquant_forward(seen["mlp_in"], t, True, t["bias"], torch.float32)
    assert bool(((seen["mlp_out"].double() - ref).abs() <= kernel_tolerance(mag, torch.float32, 1024)).all())
    for name, out in zip(("attn.to_q", "attn.to_k", "attn.to_v"), qkv):
        t = tensors(name)
        ref, mag = svdquant_forward(seen["attn_in"], t, False, t["bias"], torch.float32)
        assert bool(((out.double() - ref).abs() <= kernel_tolerance(mag, torch.float32, 256)).all()), name


U32 = 2.0 ** -24  # fp32 unit roundoff


def _is_linear(module):
    return hasattr(module, "in_features") and isinstance(getattr(module, "weight", None), torch.Tensor)


def _run_recording(model, inputs, pinned=None):
    """Run ``model``; return (output, {layer: [input, output]}) for every linear, a q/k/v group (one
    ``comfy.ops.run_linear_group`` call) being one entry "q+k+v" with a tuple of outputs. With ``pinned``
    (such a record of another model) every linear and group reads the recorded input instead of its own.

    The q/k/v members get no module hooks of their own: a hooked module would make run_linear_group fall
    back to per-module calls, and the grouped path is the one the model runs."""
    names = {id(m): n for n, m in model.named_modules()}
    seen, handles = {}, []

    def take(name, x):
        assert name not in seen, f"{name} ran twice"
        seen[name] = [x if pinned is None else pinned[name][0], None]
        return seen[name][0]

    def pre(module, args):
        return (take(names[id(module)], args[0]), *args[1:])

    def post(module, args, out):
        seen[names[id(module)]][1] = out

    real_group = comfy.ops.run_linear_group

    def group(x, modules):
        name = "+".join(names[id(m)] for m in modules)
        out = real_group(take(name, x), modules)
        seen[name][1] = out
        return out

    for name, m in model.named_modules():
        block = BLOCK.match(name)
        if _is_linear(m) and not (block and block.group(2) in JOINT_MEMBERS):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(comfy.ops, "run_linear_group", group)
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _two_runs_bound(t, x):
    """Elementwise bound on |y₁ − y₂| for two fp32 evaluations of one linear (stored tensors ``t``) on
    the same input ``x``, that may differ only in the summation order of their matmuls.

    Both runs form the same matmul operands bit for bit: all that comes before a matmul is elementwise
    or an exact max (x/smooth, the unsigned shift, absmax/qmax, rounding to codes, code·scale,
    (q − 8)·scale + zeros, dtype casts). Any summation order of an n-term fp32 sum of products (with or
    without FMA, blocked or split) is within γ_n·Σ|terms| of the exact sum, γ_n = n·u/(1 − n·u),
    u = 2⁻²⁴ (Higham, Accuracy and Stability of Numerical Algorithms, §3.1); two runs are within twice
    that of each other. Per output, with K inputs and R low-rank columns:

      float    x·Wᵀ + b                   K products and the bias            mag = |x||W|ᵀ + |b|
      AWQ      fl(x·Ŵᵀ) + b               the same, Ŵ = fl((q − 8)·s + z)     |W| → |(q − 8)·s| + |z|
      SVDQuant fl(â·ŵᵀ) + fl(fl(x·D)·Uᵀ) + b, â, ŵ the rounded code·scale operands:
               main path γ_K·|â||ŵ|ᵀ, low-rank branch γ_K·|x||D||U| + γ_R·|fl(xD)||U| ≤ γ_{K+R}·(|x||D|)|U|ᵀ,
               two additions; mag = |a||W_res|ᵀ + (|x||D|)|U|ᵀ + |b| with a, W_res the exact dequantized
               activation (``reference.quantize_activation``, fp32 as the kernel computes it) and weight.

    The roundings of the operands themselves (|ŵ| ≤ (1 + u)|w|, twice for Ŵ and â·ŵ) and of the final
    additions add at most 5 to n, so n = K + R + 5 covers every case (R = 0 without a low-rank branch).
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    xa = x.double().abs()
    k = x.shape[-1]
    rank = 0
    if "comfy_quant" not in t:
        mag = xa @ t["weight"].double().abs().t()
    elif "weight_zeros" in t:
        g = k // t["weight_scale"].shape[0]
        q = unpack_nibbles(t["weight"], signed=False).double() - 8
        s = t["weight_scale"].double().t().repeat_interleave(g, 1)
        z = t["weight_zeros"].double().t().repeat_interleave(g, 1)
        mag = xa @ ((q * s).abs() + z.abs()).t()
    else:
        unsigned = json.loads(bytes(t["comfy_quant"].tolist()))["act_unsigned"]
        a = quantize_activation(x + UNSIGNED_SHIFT if unsigned else x, t["weight_smooth_factor"], unsigned,
                                torch.float32)
        rank = t["weight_proj_down"].shape[1]
        mag = (a.abs() @ svdquant_residual(t).abs().t()
               + (xa @ t["weight_proj_down"].double().abs()) @ t["weight_proj_up"].double().abs().t())
    if t.get("bias") is not None:
        mag = mag + t["bias"].double().abs()
    n = k + rank + 5
    return (2 * n * U32 / (1 - n * U32) * mag).view(*shape[:-1], -1)


def _layer_tensors(sd, layer):
    p = layer + "."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def test_quantizer_output_reloads_bit_identically(int4_file, tmp_path):
    """The loader's part of a save → reload round trip is bit-exact: every state-dict entry (int4 codes,
    scales, low-rank factors, smoothing, biases, comfy_quant JSON, float weights) comes back with the
    same keys, dtype and bits, from the quantizer's file and again after saving the loaded model.

    The two models' outputs are not bit-identical, and need not be. A file-loaded fp32 tensor is a view
    into the file buffer at its data offset (linear_1's weight sits 8 bytes off a 64-byte line), while
    tensors converted at load (bf16 → fp32) are fresh 64-byte-aligned allocations; MKL chooses its
    summation order by alignment, so equal operands give other last bits (CI, AMD EPYC/AVX2: linear_1
    rel 1.7e-6, final output 0.09). Nor has a W4A4 model's end-to-end output any roundoff-sized bound: a
    last-bit change of an activation next to a rounding boundary flips its int4 code, a whole step, and
    later layers spread it (a 1.7e-6 relative perturbation of linear_1's output moves this model's output
    by up to 0.6 of |y| ≤ 130; the float model's by 4e-4).

    What is derivable is per linear: the reloaded model runs with every linear (and q/k/v group) fed the
    input the first model's one saw, and each output must agree within ``_two_runs_bound`` (derivation
    there): 2·γ_n·Σ|terms|, n = K + R + 5, i.e. 3e-5 … 1.3e-4 of Σ|terms| for K = 256 … 1024. That is far
    below what a loader error does: measured, one changed int4 weight code exceeds it 10×, a flipped
    act_unsigned 46×, while summing every matmul in another order (K split in halves) reaches 3 % of it.
    The model output is proj_out's output reshaped (unpatchify permutes and crops), so it is within
    proj_out's bound."""
    _, dst = int4_file
    stored = comfy.utils.load_torch_file(str(dst))
    patcher = load(dst)
    reloaded = {k[len("diffusion_model."):]: v for k, v in patcher.model_state_dict().items()}
    assert sorted(reloaded) == sorted(stored)
    for k, v in stored.items():
        # float tensors load in the fp32 compute dtype; bf16 → fp32 is exact and one-to-one, so equality
        # after widening is equality of the stored bits. Integer tensors (codes, comfy_quant) keep theirs.
        r = reloaded[k]
        assert r.dtype == (torch.float32 if v.is_floating_point() else v.dtype) and r.shape == v.shape, k
        assert torch.equal(r, v.to(r.dtype)), k

    again = tmp_path / "again.safetensors"
    comfy.utils.save_torch_file(reloaded, again)
    patcher_b = load(again)
    reloaded_b = {k[len("diffusion_model."):]: v for k, v in patcher_b.model_state_dict().items()}
    for other in (comfy.utils.load_torch_file(str(again)), reloaded_b):  # the file, and the model from it
        assert sorted(other) == sorted(reloaded)
        for k, v in reloaded.items():
            assert other[k].dtype == v.dtype and other[k].shape == v.shape and torch.equal(other[k], v), k

    inputs = demo_inputs(CFG)
    y_a, rec_a = _run_recording(patcher.model.diffusion_model, inputs)
    y_b, rec_b = _run_recording(patcher_b.model.diffusion_model, inputs, pinned=rec_a)
    assert sorted(rec_b) == sorted(rec_a)  # the same linears and q/k/v calls ran
    groups = [name.split("+") for name in rec_b if "+" in name]
    assert len(groups) == 2 * CFG.num_layers
    for group in groups:  # tied again at load, so the reloaded q/k/v share one activation quantization
        params = [patcher_b.model.diffusion_model.get_submodule(m).weight._params for m in group]
        assert all(p.proj_down is params[0].proj_down and p.smooth_factor is params[0].smooth_factor
                   for p in params), group
    bounds, worst = {}, 0.0
    for name, (x, out_a) in rec_a.items():
        out_b = rec_b[name][1]
        outs_a, outs_b = (out_a, out_b) if isinstance(out_a, tuple) else ((out_a,), (out_b,))
        for layer, ya, yb in zip(name.split("+"), outs_a, outs_b, strict=True):
            bounds[layer] = tol = _two_runs_bound(_layer_tensors(stored, layer), x)
            err = (ya.double() - yb.double()).abs()
            worst = max(worst, float((err / tol).max()))
            assert bool((err <= tol).all()), f"{layer}: max err {float(err.max()):.3e}, err/bound {worst:.3f}"
    assert set(bounds) == {k[: -len(".weight")] for k in stored if k.endswith(".weight") and stored[k].dim() == 2}
    err = float((y_a.double() - y_b.double()).abs().max())
    assert y_a.shape == y_b.shape and err <= float(bounds["proj_out"].max()), err


def test_streamed_file_equals_in_memory_quantization(float_sd, int4_file):
    _, dst = int4_file
    mem, meta = quantize_state_dict(dict(float_sd), QuantizeOptions(rank=16), progress=False)
    disk = comfy.utils.load_torch_file(str(dst))
    assert mem.keys() == disk.keys() and all(torch.equal(mem[k], disk[k]) for k in mem)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert layers["transformer_blocks.0.img_mlp.net.2"]["act_unsigned"] is True
    assert layers["transformer_blocks.0.img_mod.1"] == {"format": "awq_w4a16", "group_size": 64}


# ---- quantizer math ----

def test_svdquant_quantizer_round_to_nearest_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) / 16
    act = torch.rand(256, generator=g) * 4 + 0.1
    (t,) = quantize_svdquant([w], [None], act, options=QuantizeOptions(rank=8))
    s = t["weight_smooth_factor"].double()
    low = t["weight_proj_up"].double() @ t["weight_proj_down"].double().t()
    # residual in the smoothed space is within half a step of its int4 rounding (no clamping at ±7·scale)
    target = (w.double() - low) * s
    step = t["weight_scale"].double().t().repeat_interleave(64, 1)
    assert bool(((svdquant_residual(t) - target).abs() <= step / 2 + 1e-6 * target.abs().max()).all())


def test_svdquant_quantizer_shares_qkv_and_compensates_unsigned_bias():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(64, 128, generator=g) / 11 for _ in range(3)]
    parts = quantize_svdquant(ws, [None] * 3, options=QuantizeOptions(rank=8))
    assert all(torch.equal(p["weight_proj_down"], parts[0]["weight_proj_down"]) for p in parts)
    assert all(torch.equal(p["weight_smooth_factor"], parts[0]["weight_smooth_factor"]) for p in parts)
    assert parts[0]["weight_proj_up"].shape == (64, 8)

    w, b = torch.randn(64, 128, generator=g) / 11, torch.randn(64, generator=g) * 0.1
    (t,) = quantize_svdquant([w], [b], options=QuantizeOptions(rank=8, dtype=torch.float32), act_unsigned=True)
    x = torch.nn.functional.gelu(torch.randn(32, 128, generator=g), approximate="tanh")
    exact = x.double() @ w.double().t() + b.double()
    y, _ = svdquant_forward(x, t, True, t["bias"], torch.float32)
    y_uncompensated, _ = svdquant_forward(x, t, True, b, torch.float32)
    # the shifted main path adds 0.171875·Σ_k Q[n, k]/s_k to every row; the stored bias removes exactly that
    shift = 0.171875 * (svdquant_residual(t) / t["weight_smooth_factor"].double()).sum(1)
    assert torch.allclose(t["bias"].double(), b.double() - shift, rtol=0, atol=1e-6)
    assert float((y - exact).abs().mean()) < 0.75 * float((y_uncompensated - exact).abs().mean())


def test_awq_quantizer_round_to_nearest_bound():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 128, generator=g)
    t = quantize_awq(w, options=QuantizeOptions(dtype=torch.float32))
    step = t["weight_scale"].double().t().repeat_interleave(64, 1)
    assert bool(((awq_weight(t, 64) - w.double()).abs() <= step / 2 + 1e-5).all())


def test_quantizer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_svdquant([torch.randn(8, 100)], [None])
    with pytest.raises(ValueError, match="joint q/k/v"):
        quantize_state_dict({"transformer_blocks.0.attn.to_q.weight": torch.randn(64, 64)}, progress=False)


def test_edit_model_quantized_runs_reference_latents(float_sd):
    sd = dict(float_sd, __index_timestep_zero__=torch.tensor([]))
    q, meta = quantize_state_dict(sd, QuantizeOptions(rank=8), progress=False)
    patcher = load_state(q, meta)
    model = patcher.model.diffusion_model
    rows = []
    model.transformer_blocks[0].img_mod[1].register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    x, t, ctx = demo_inputs(CFG, batch=2)
    with torch.no_grad():
        out = model(x, t, ctx, ref_latents=[x[:, :, 0]])
    assert out.shape == x.shape and rows == [4] and torch.isfinite(out).all()


# ---- inspect and CLI ----

def test_inspect_reports_layers_and_problems(int4_file, tmp_path):
    _, dst = int4_file
    report = inspect_checkpoint(dst)
    assert not report.problems
    assert sum(layer.format == "svdquant_w4a4" for layer in report.layers) == 24
    up = next(layer for layer in report.layers if layer.name == "transformer_blocks.0.img_mlp.net.2")
    assert (up.out_features, up.in_features, up.rank, up.act_unsigned) == (256, 1024, 16, True)

    sd = comfy.utils.load_torch_file(str(dst))
    sd["transformer_blocks.0.attn.to_k.weight_scale"] = sd["transformer_blocks.0.attn.to_k.weight_scale"][:2]
    del sd["transformer_blocks.1.img_mod.1.weight_zeros"]
    sd["transformer_blocks.1.attn.to_out.0.comfy_quant"] = torch.tensor(list(b'{"format": "fp3"}'), dtype=torch.uint8)
    bad = tmp_path / "bad.safetensors"
    comfy.utils.save_torch_file(sd, bad)
    problems = "\n".join(inspect_checkpoint(bad).problems)
    assert "transformer_blocks.0.attn.to_k" in problems and "weight_scale" in problems
    assert "transformer_blocks.1.img_mod.1" in problems and "weight_zeros" in problems
    assert "transformer_blocks.1.attn.to_out.0" in problems and "fp3" in problems


def _cli(*args, cwd):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "comfy.quant", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("convert", [quantize_file, convert_nunchaku_file], ids=["quantize", "nunchaku"])
def test_converters_refuse_to_overwrite_their_input(float_sd, tmp_path, convert):
    """Output == input (the same path, another spelling of it, a path through a symlinked directory, a
    symlink or a hard link to it) is refused with a ValueError naming both paths before anything is
    written: the input stays byte-identical."""
    src = tmp_path / "model.safetensors"
    comfy.utils.save_torch_file(float_sd, src)
    original = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "here").symlink_to(tmp_path, target_is_directory=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    for out in (src, tmp_path / "sub" / ".." / "model.safetensors", tmp_path / "here" / "model.safetensors",
                link, hard):
        with pytest.raises(ValueError, match="same file") as exc:
            convert(str(src), str(out))
        assert str(src) in str(exc.value) and str(out) in str(exc.value)
        assert src.read_bytes() == original, out
        assert not partial_files(os.path.dirname(str(out)))
    assert link.is_symlink() and os.path.samefile(link, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.safetensors", "here", "link.safetensors",
                                                          "model.safetensors", "sub"]


def test_cli_quantize_refuses_to_overwrite_its_input(float_sd, tmp_path):
    """``python -m comfy.quant quantize X X`` (or X through a symlink) exits non-zero, says why, writes nothing."""
    src = tmp_path / "model.safetensors"
    comfy.utils.save_torch_file(float_sd, src)
    original = src.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    for out in (src, link):
        r = _cli("quantize", str(src), str(out), cwd=tmp_path)
        assert r.returncode != 0 and "same file" in r.stderr and str(src) in r.stderr, r.stdout + r.stderr
        assert "wrote" not in r.stdout
        assert src.read_bytes() == original, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "model.safetensors"]


def test_cli_demo_and_inspect(tmp_path, int4_file):
    r = _cli("demo", "--workdir", str(tmp_path / "demo"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "svdquant_w4a4" in r.stdout and "cosine" in r.stdout and "PSNR" in r.stdout
    assert "checks (all passed" in r.stdout and "[FAIL]" not in r.stdout, r.stdout
    assert "[PASS] removing the LoRA restores the int4 model: output bit-exact" in r.stdout, r.stdout
    cos = float(r.stdout.split("[PASS] int4 agrees with bf16: output cosine ")[1].split(" ")[0])
    assert cos >= 0.97 and not math.isnan(cos)
    r = _cli("inspect", str(int4_file[1]), cwd=tmp_path)
    assert r.returncode == 0 and "problems: 0" in r.stdout, r.stdout + r.stderr

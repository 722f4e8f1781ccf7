"""Sanity of the Z-Image / Flux.1 fixtures (arch_fixtures.py) that issue #11's tests build on.

(a) ``comfy_float_state_dict`` has exactly the keys and shapes of upstream's model as upstream's own
    ``UNETLoader`` builds it (scenario ``arch_keys`` in a patched copy of upstream ComfyUI; no missing or
    unexpected keys); (b) ``to_nunchaku`` -> the test-side spec unpackers (``from_nunchaku``) gives back the
    natural tensors bit for bit, and the Nunchaku file has the names/layout the spec lists; the native file
    describes the same model as the float one, and its fused / split layers compute what their Nunchaku
    parts compute; (c) float64 reference forwards of a W4A4 and an AWQ module are finite and deterministic.
Nothing here imports ``comfy.quant``.
"""
from __future__ import annotations

import json

import pytest
import torch

import arch_fixtures as A
import nunchaku_packer as P
import upstream_env as U
from reference import awq_forward, svdquant_forward

from arch_fixtures import VARIANTS, bits_equal, decode_json  # noqa: E402


@pytest.fixture(scope="module")
def nats():
    return {v: A.natural_int4(arch, cfg, seed=3) for v, (arch, cfg) in VARIANTS.items()}


# ============================================================================ configs and float weights

def test_tiny_configs():
    z, f = A.tiny_config("zimage"), A.tiny_config("flux")
    assert (z.dim, z.n_heads, z.head_dim, z.n_layers, z.n_refiner_layers) == (384, 3, 128, 2, 2)
    assert z.ffn_hidden == int(z.dim / 3 * 8) == 1024       # upstream's 256-rounded width == diffusers'
    assert (f.hidden_size, f.num_heads, f.depth, f.depth_single_blocks, f.mlp_hidden) == (256, 2, 2, 2, 1024)
    with pytest.raises(AssertionError, match="diffusers"):
        A.with_cfg("zimage", dim=256, n_heads=2)              # 768 upstream vs 682 in diffusers
    with pytest.raises(ValueError):
        A.tiny_config("sdxl")


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_state_dict_keys_and_values(variant):
    arch, cfg = VARIANTS[variant]
    shapes = A.comfy_shapes(arch, cfg)
    sd = A.comfy_float_state_dict(arch, cfg, seed=3)
    assert list(sd) == list(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in sd.values())
    # trained-like: a 2-D weight has a few dominant singular directions
    w = sd[next(k for k in sd if k.endswith("w2.weight") or k.endswith("mlp.2.weight"))].float()
    s = torch.linalg.svdvals(w)
    assert s[:8].square().sum() / s.square().sum() > 0.2


@pytest.mark.parametrize("arch", A.ARCHS)
def test_float_state_dict_deterministic(arch):
    """Same seed -> bit-identical tensors (also when built afresh, bypassing the cache, and as a subset);
    another seed -> other values; callers get copies they may modify."""
    sd = A.comfy_float_state_dict(arch, seed=3)
    fresh = A._float_cached.__wrapped__(arch, A.tiny_config(arch), 3, torch.bfloat16, None)
    assert all(bits_equal(v, fresh[k]) for k, v in sd.items())
    keys = [k for k in sd if k.endswith(".bias")][:3] + [next(iter(sd))]
    sub = A.comfy_float_state_dict(arch, seed=3, keys=keys)
    assert list(sub) == keys and all(bits_equal(sub[k], sd[k]) for k in keys)
    other = A.comfy_float_state_dict(arch, seed=4, keys=keys)
    assert not any(torch.equal(other[k], sd[k]) for k in keys)
    sd[keys[0]].zero_()
    assert A.comfy_float_state_dict(arch, seed=3, keys=keys[:1])[keys[0]].any()
    assert A.comfy_float_state_dict(arch, seed=3, dtype=torch.float32, keys=keys)[keys[0]].dtype == torch.float32
    with pytest.raises(KeyError):
        A.comfy_float_state_dict(arch, keys=["no.such.weight"])


def test_zimage_block_layout():
    shapes = A.comfy_shapes("zimage")
    assert "noise_refiner.1.adaLN_modulation.0.weight" in shapes
    assert not any(k.startswith("context_refiner.") and "adaLN" in k for k in shapes)
    assert shapes["layers.0.adaLN_modulation.0.weight"] == (4 * 384, 256)      # z_image_modulation: min(dim, 256)
    assert shapes["t_embedder.mlp.2.weight"] == (256, 384)                      # output 256, hidden min(dim, 1024)
    assert not any(k.endswith(".bias") and (".attention." in k or ".feed_forward." in k) for k in shapes)


# ============================================================================ (b) Nunchaku round trip

@pytest.mark.parametrize("variant", VARIANTS)
def test_nunchaku_round_trip_exact(variant, nats):
    nat = nats[variant]
    sd, meta = A.to_nunchaku(nat)
    back = A.from_nunchaku(sd, meta)              # config read from the file's metadata
    assert back["arch"] == nat["arch"]
    assert set(back["float"]) == set(nat["float"])
    for k, v in nat["float"].items():
        assert bits_equal(v, back["float"][k]), k
    for kind in ("w4a4", "awq"):
        assert set(back[kind]) == set(nat[kind]), kind
        for mod, e in nat[kind].items():
            assert set(back[kind][mod]) == set(e), mod
            for name, v in e.items():
                got = back[kind][mod][name]
                assert bits_equal(v, got) if isinstance(v, torch.Tensor) else v == got, (mod, name)
    # every stored tensor was read: nothing in the file the plan does not know
    names = A._w4a4_names(nat["arch"])
    quant_keys = {f"{m}.{x}" for m, e in nat["w4a4"].items()
                  for x in ("qweight", "wscales", *names.values(), *(("bias",) if "bias" in e else ()))}
    quant_keys |= {f"{m}.{x}" for m in nat["awq"] for x in ("qweight", "wscales", "wzeros", "bias")}
    float_keys = {k for _, nks, _ in A.plan(nat["arch"], nat["cfg"]).floats for k in nks}
    assert set(sd) == quant_keys | float_keys and not quant_keys & float_keys


def test_nunchaku_round_trip_needs_the_inverse_permutations(nats):
    """The unpackers are not identities: reading tile-order tensors as natural ones gives other values."""
    nat = nats["zimage"]
    sd, _ = A.to_nunchaku(nat)
    w = nat["w4a4"]["layers.0.attention.to_qkv"]
    stored = sd["layers.0.attention.to_qkv.qweight"]
    assert not torch.equal(P.kitchen_unpack(stored, signed=True).to(torch.int8), w["codes"])
    assert not torch.equal(sd["layers.0.attention.to_qkv.wscales"], w["weight_scale"])
    assert not torch.equal(sd["layers.0.attention.to_qkv.proj_up"], w["weight_proj_up"])


def test_zimage_nunchaku_file_names(nats):
    nat = nats["zimage"]
    sd, meta = A.to_nunchaku(nat)
    fl = A.comfy_float_state_dict("zimage", seed=3)
    f = A.tiny_config("zimage").ffn_hidden
    for mod in ("attention.to_qkv", "attention.to_out.0", "feed_forward.net.0.proj", "feed_forward.net.2"):
        for x in ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up"):
            assert f"layers.1.{mod}.{x}" in sd
        assert f"layers.1.{mod}.bias" not in sd                                   # no biases on W4A4
    assert sd["layers.0.feed_forward.net.0.proj.qweight"].shape == (2 * f, 384 // 2)
    assert bits_equal(sd["layers.0.attention.norm_q.weight"], fl["layers.0.attention.q_norm.weight"])
    assert bits_equal(sd["all_x_embedder.2-1.weight"], fl["x_embedder.weight"])
    assert bits_equal(sd["all_final_layer.2-1.adaLN_modulation.1.bias"], fl["final_layer.adaLN_modulation.1.bias"])
    # skip_refiners: bf16 refiners in diffusers layout, net.0.proj fused [w3; w1]
    for p in ("noise_refiner.0", "context_refiner.1"):
        assert f"{p}.attention.to_qkv.qweight" not in sd
        assert torch.equal(torch.cat([sd[f"{p}.attention.to_{x}.weight"] for x in "qkv"]), fl[f"{p}.attention.qkv.weight"])
        assert bits_equal(sd[f"{p}.attention.to_out.0.weight"], fl[f"{p}.attention.out.weight"])
        w13 = sd[f"{p}.feed_forward.net.0.proj.weight"]
        assert torch.equal(w13[:f], fl[f"{p}.feed_forward.w3.weight"]) and torch.equal(w13[f:], fl[f"{p}.feed_forward.w1.weight"])
        assert bits_equal(sd[f"{p}.feed_forward.net.2.weight"], fl[f"{p}.feed_forward.w2.weight"])
    assert "noise_refiner.0.adaLN_modulation.0.weight" in sd and "context_refiner.0.adaLN_modulation.0.weight" not in sd
    assert meta["model_class"] == "NunchakuZImageTransformer2DModel"
    qc, conf = json.loads(meta["quantization_config"]), json.loads(meta["config"])
    assert qc["skip_refiners"] is True and qc["rank"] == 32 and qc["weight"] == {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    assert (conf["dim"], conf["n_heads"], conf["n_layers"], conf["n_refiner_layers"], conf["cap_feat_dim"]) == (384, 3, 2, 2, 128)
    # quantized refiners use the W4A4 names (context_refiner has no adaLN either way)
    sd2, meta2 = A.to_nunchaku(nats["zimage-refiners-quantized"])
    assert "context_refiner.0.attention.to_qkv.qweight" in sd2 and "context_refiner.0.attention.to_q.weight" not in sd2
    assert json.loads(meta2["quantization_config"])["skip_refiners"] is False


def test_flux_nunchaku_file_names(nats):
    nat = nats["flux-dev"]
    sd, meta = A.to_nunchaku(nat)
    fl = A.comfy_float_state_dict("flux", seed=3)
    d = 256
    for mod in ("qkv_proj", "qkv_proj_context", "out_proj", "out_proj_context", "mlp_fc1", "mlp_fc2",
                "mlp_context_fc1", "mlp_context_fc2"):
        for x in ("qweight", "wscales", "smooth", "smooth_orig", "lora_down", "lora_up", "bias"):
            assert f"transformer_blocks.1.{mod}.{x}" in sd, (mod, x)
        assert f"transformer_blocks.1.{mod}.smooth_factor" not in sd                 # legacy names only
    for mod in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2"):
        assert f"single_transformer_blocks.1.{mod}.qweight" in sd
    for mod, s in (("transformer_blocks.0.norm1.linear", 6), ("transformer_blocks.0.norm1_context.linear", 6),
                   ("single_transformer_blocks.0.norm.linear", 3)):
        assert sd[f"{mod}.qweight"].shape == (s * d // 4, d // 2) and sd[f"{mod}.qweight"].dtype == torch.int32
        assert sd[f"{mod}.wscales"].shape == (16, s * d)                              # 4 groups padded to 16
        assert not sd[f"{mod}.wzeros"][4:].any()
    # single-block out_proj stores a zero bias; folded smoothing: smooth 1, shared smooth_orig
    assert not sd["single_transformer_blocks.0.out_proj.bias"].any()
    assert torch.equal(sd["transformer_blocks.0.out_proj.smooth"], torch.ones(d, dtype=torch.bfloat16))
    assert torch.equal(sd["transformer_blocks.0.out_proj.smooth_orig"], sd["transformer_blocks.0.out_proj_context.smooth_orig"])
    assert torch.equal(sd["single_transformer_blocks.0.qkv_proj.smooth"], sd["single_transformer_blocks.0.mlp_fc1.smooth"])
    assert bits_equal(sd["transformer_blocks.0.norm_added_k.weight"], fl["double_blocks.0.txt_attn.norm.key_norm.weight"])
    assert bits_equal(sd["single_transformer_blocks.1.norm_q.weight"], fl["single_blocks.1.norm.query_norm.weight"])
    # diffusers names for the unquantized layers; norm_out.linear is [scale; shift]
    assert bits_equal(sd["context_embedder.weight"], fl["txt_in.weight"])
    assert bits_equal(sd["time_text_embed.guidance_embedder.linear_2.bias"], fl["guidance_in.out_layer.bias"])
    assert bits_equal(sd["proj_out.weight"], fl["final_layer.linear.weight"])
    shift, scale = fl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(sd["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert meta["model_class"] == "NunchakuFluxTransformer2dModel"
    cc = json.loads(meta["comfy_config"])
    assert cc["model_class"] == "Flux" and cc["model_config"]["hidden_size"] == d
    assert json.loads(meta["config"])["num_single_layers"] == 2
    sd2, meta2 = A.to_nunchaku(nats["flux-schnell-unfolded"])
    assert not any(k.startswith("time_text_embed.guidance_embedder") for k in sd2)
    assert json.loads(meta2["comfy_config"])["model_class"] == "FluxSchnell"
    assert not torch.equal(sd2["transformer_blocks.0.out_proj.smooth"], torch.ones(d, dtype=torch.bfloat16))


def test_awq_exact_grids(nats):
    """The AWQ value choices make the Nunchaku representation exact (to_nunchaku asserts it too)."""
    for mod, a in nats["flux-dev"]["awq"].items():
        t = A.awq_nunchaku_tensors(a)
        s, z = a["weight_scale"].double(), a["weight_zeros"].double()
        assert torch.equal(P.interleave(z - 8 * s, a["s"], 1), t["wzeros"].double()), mod
        assert ((a["bias"].double() * 128).round() == a["bias"].double() * 128).all()


# ============================================================================ native file

@pytest.mark.parametrize("variant", VARIANTS)
def test_native_file_describes_the_float_model(variant, nats):
    nat = nats[variant]
    arch, cfg = nat["arch"], nat["cfg"]
    shapes = A.comfy_shapes(arch, cfg)
    fl = A.comfy_float_state_dict(arch, cfg, seed=3)
    sd, meta = A.to_native(nat)
    layers = A.native_layers(nat)
    assert json.loads(meta["config"]) == json.loads(A.nunchaku_metadata(arch, cfg)["config"])
    assert {k[:-len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")} == set(layers)
    logical = {}
    for k, v in sd.items():
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".comfy_quant") or (layer in layers and not k.endswith((".weight", ".bias"))):
            continue
        logical[k] = (v.shape[0], v.shape[1] * 2) if layer in layers and k.endswith(".weight") else tuple(v.shape)
    assert logical == shapes
    for k, v in nat["float"].items():
        assert bits_equal(v, sd[k]) and bits_equal(v, fl[k]), k
    for layer, (t, conf) in layers.items():
        assert decode_json(sd[f"{layer}.comfy_quant"]) == conf
        if conf["format"] == "awq_w4a16":
            assert set(t) == {"weight", "weight_scale", "weight_zeros", "bias"}
            continue
        n, k = t["weight"].shape[0], t["weight"].shape[1] * 2
        r = conf["rank"]
        assert t["weight_scale"].shape == (k // 64, n) and t["weight_smooth_factor"].shape == (k,)
        assert t["weight_proj_down"].shape == (k, r) and t["weight_proj_up"].shape == (n, r)
        assert ("bias" in t) == (arch == "flux")


def test_native_special_layers():
    nat = A.natural_int4("flux", seed=1)
    layers = A.native_layers(nat)
    d, m, r = 256, 1024, 32
    t1, c1 = layers["single_blocks.0.linear1"]
    assert c1 == {"format": "svdquant_w4a4", "group_size": 64, "rank": 2 * r, "act_unsigned": False}
    assert t1["weight_proj_up"].shape == (3 * d + m, 2 * r)
    assert not t1["weight_proj_up"][:3 * d, r:].any() and not t1["weight_proj_up"][3 * d:, :r].any()
    t2, c2 = layers["single_blocks.0.linear2"]
    assert c2 == {"format": "svdquant_w4a4", "group_size": 64, "rank": 2 * r, "act_unsigned": [False, True],
                  "in_splits": [d, m]}
    assert not t2["weight_proj_down"][:d, r:].any() and not t2["weight_proj_down"][d:, :r].any()
    assert bits_equal(t2["bias"], nat["w4a4"]["single_transformer_blocks.0.mlp_fc2"]["bias"])
    for st in ("img", "txt"):
        assert layers[f"double_blocks.1.{st}_mlp.2"][1]["act_unsigned"] is True
        assert layers[f"double_blocks.1.{st}_attn.qkv"][1]["act_unsigned"] is False
    z = A.natural_int4("zimage", seed=1)
    zl = A.native_layers(z)
    f = A.tiny_config("zimage").ffn_hidden
    w13 = z["w4a4"]["layers.0.feed_forward.net.0.proj"]
    assert bits_equal(P.kitchen_pack(w13["codes"][:f]), zl["layers.0.feed_forward.w3"][0]["weight"])
    assert bits_equal(P.kitchen_pack(w13["codes"][f:]), zl["layers.0.feed_forward.w1"][0]["weight"])
    assert zl["layers.0.feed_forward.w2"][1]["act_unsigned"] is False


def _x(rows, k, seed, unsigned=False):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.gelu(x, approximate="tanh") if unsigned else x


def _close(a, b):
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max())), float((a - b).abs().max())


def test_native_fused_layers_compute_their_nunchaku_parts():
    """float64 references: linear1 = [qkv_proj(x); mlp_fc1(x)], linear2(cat(a, g)) = out_proj(a) + mlp_fc2(g)
    (mlp_fc2 unsigned, bias once), Z-Image w3 / w1 = the halves of net.0.proj: the native forms are exact."""
    nat = A.natural_int4("flux", seed=2)
    layers = A.native_layers(nat)
    q = "single_transformer_blocks.1"
    parts = {m: A.natural_w4a4_tensors(nat["w4a4"][f"{q}.{m}"]) for m in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2")}
    x = _x(5, 256, 0)
    y1, _ = A.w4a4_reference(x, *layers["single_blocks.1.linear1"], torch.bfloat16)
    _close(y1, torch.cat([svdquant_forward(x, parts[m], False, parts[m]["bias"], torch.bfloat16)[0]
                          for m in ("qkv_proj", "mlp_fc1")], -1))
    a, g = _x(5, 256, 1), _x(5, 1024, 2, unsigned=True)
    y2, _ = A.w4a4_reference(torch.cat([a, g], -1), *layers["single_blocks.1.linear2"], torch.bfloat16)
    want = (svdquant_forward(a, parts["out_proj"], False, None, torch.bfloat16)[0]
            + svdquant_forward(g, parts["mlp_fc2"], True, parts["mlp_fc2"]["bias"], torch.bfloat16)[0])
    _close(y2, want)
    # one bool for the whole of linear2 would be wrong on one half or the other
    t2, c2 = layers["single_blocks.1.linear2"]
    one_bool = {k: v for k, v in c2.items() if k != "in_splits"}
    for wrong in (False, True):
        yw, _ = A.w4a4_reference(torch.cat([a, g], -1), t2, {**one_bool, "act_unsigned": wrong}, torch.bfloat16)
        assert (yw - want).abs().max() > 1e-3 * want.abs().max()
    z = A.natural_int4("zimage", seed=2)
    zl = A.native_layers(z)
    f = A.tiny_config("zimage").ffn_hidden
    xz = _x(4, 384, 3)
    full, _ = svdquant_forward(xz, A.natural_w4a4_tensors(z["w4a4"]["layers.1.feed_forward.net.0.proj"]), False, None,
                               torch.bfloat16)
    _close(A.w4a4_reference(xz, *zl["layers.1.feed_forward.w3"], torch.bfloat16)[0], full[:, :f])
    _close(A.w4a4_reference(xz, *zl["layers.1.feed_forward.w1"], torch.bfloat16)[0], full[:, f:])


# ============================================================================ (c) references

def test_reference_forwards_finite_and_deterministic():
    z = A.natural_int4("zimage", seed=4)
    w = A.natural_w4a4_tensors(z["w4a4"]["layers.0.attention.to_qkv"])
    x = _x(6, 384, 10)
    y, mag = svdquant_forward(x, w, False, None, torch.bfloat16)
    y2, mag2 = svdquant_forward(x, w, False, None, torch.bfloat16)
    assert y.shape == (6, 3 * 384) and y.dtype == torch.float64
    assert torch.isfinite(y).all() and torch.isfinite(mag).all() and y.abs().max() > 0
    assert torch.equal(y, y2) and torch.equal(mag, mag2)
    f = A.natural_int4("flux", seed=4)
    a = A.natural_awq_tensors(f["awq"]["transformer_blocks.0.norm1.linear"])
    xa = torch.nn.functional.silu(_x(2, 256, 11))
    ya, ma = awq_forward(xa, a, 64, a["bias"])
    ya2, _ = awq_forward(xa, a, 64, a["bias"])
    assert ya.shape == (2, 6 * 256) and torch.isfinite(ya).all() and torch.isfinite(ma).all() and ya.abs().max() > 0
    assert torch.equal(ya, ya2)
    # natural fixtures are seeded: the same seed gives the same tensors, another seed others
    assert torch.equal(A.natural_int4("flux", seed=4)["awq"]["transformer_blocks.0.norm1.linear"]["codes"],
                       f["awq"]["transformer_blocks.0.norm1.linear"]["codes"])
    assert not torch.equal(A.natural_int4("flux", seed=5)["awq"]["transformer_blocks.0.norm1.linear"]["codes"],
                           f["awq"]["transformer_blocks.0.norm1.linear"]["codes"])


# ============================================================================ (a) upstream's own model

FILES = {"zimage": "tiny-z-image-bf16.safetensors", "flux": "tiny-flux1-dev-bf16.safetensors"}


@pytest.fixture(scope="module")
def arch_keys(tmp_path_factory):
    """One ``arch_keys`` scenario in a patched copy of upstream (copied and installed here, without
    running upstream's unit tests) on the two float files."""
    reason = U.upstream_skip_reason()
    if reason:
        pytest.skip(reason)
    if not U.PATCH.is_file():
        pytest.skip(f"the upstream patch {U.PATCH} does not exist yet")
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("arch-keys")
    models = root / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "loras").mkdir()
    for arch, name in FILES.items():
        save_file(A.comfy_float_state_dict(arch, seed=0), str(models / "diffusion_models" / name))
    copy = U.copy_upstream(root / "ComfyUI")
    U.install_project(copy)
    return U.run_in_comfyui(copy, "arch_keys", root / "work", models_dir=models, files=FILES, zimage_shim=["zimage"])


def _assert_same_model(info, arch):
    want = {k: list(v) for k, v in A.comfy_shapes(arch).items()}
    got = info["state_dict"]
    assert sorted(set(want) - set(got)) == [], "fixture keys upstream's model lacks"
    assert sorted(set(got) - set(want)) == [], "upstream's model keys the fixture lacks"
    assert {k: got[k] for k in want if got[k] != want[k]} == {}
    att = info["attempts"][info["loaded_by"]]
    assert att["missing"] == [] and att["unexpected"] == []


def test_flux_keys_match_upstream_unet_loader(arch_keys):
    info = arch_keys["files"]["flux"]
    print(f"[flux] {info.get('config_class')} {info.get('unet_config')}")
    assert info["loaded_by"] == "plain", info["attempts"]
    assert (info["model_class"], info["config_class"], info["diffusion_model_class"]) == ("Flux", "Flux", "Flux")
    uc, cfg = info["unet_config"], A.tiny_config("flux")
    assert (uc["hidden_size"], uc["num_heads"], uc["depth"], uc["depth_single_blocks"], uc["context_in_dim"],
            uc["vec_in_dim"], uc["guidance_embed"], uc["in_channels"]) == (
        cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single_blocks, cfg.context_in_dim, cfg.vec_in_dim,
        True, 16)
    _assert_same_model(info, "flux")


def test_zimage_keys_match_upstream_model(arch_keys):
    """Upstream's NextDiT built by UNETLoader as Z-Image (with the width shim where its detection cannot
    read a small Z-Image's widths) has exactly the fixture's keys and shapes."""
    info = arch_keys["files"]["zimage"]
    print(f"[zimage] loaded by {info['loaded_by']}, shim {info['shim']}, {info.get('unet_config')}")
    assert info["loaded_by"] is not None, info["attempts"]
    assert (info["model_class"], info["config_class"], info["diffusion_model_class"]) == ("Lumina2", "ZImage", "NextDiT")
    uc = info["unet_config"]
    assert (uc["dim"], uc["n_heads"], uc["n_layers"], uc["cap_feat_dim"], uc["z_image_modulation"]) == (384, 3, 2, 128, True)
    _assert_same_model(info, "zimage")


def test_zimage_detected_by_the_patched_loader_alone(arch_keys):
    """Without the shim: expected to fail until the patch derives Z-Image's widths from tensor shapes
    (upstream's detection knows Z-Image only at dim 3840)."""
    info = arch_keys["files"]["zimage"]
    plain = info["attempts"]["plain"]
    if not plain["ok"]:
        pytest.xfail("upstream detection reads Z-Image widths only at dim 3840: " + plain["error"].strip().splitlines()[-1])
    assert info["loaded_by"] == "plain" and info["config_class"] == "ZImage"
    _assert_same_model(info, "zimage")

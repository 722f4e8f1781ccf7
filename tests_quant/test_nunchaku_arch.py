"""Nunchaku conversion of Z-Image and Flux.1 (issue 11), against the independent fixtures of arch_fixtures.py.

The oracle: ``arch_fixtures.to_nunchaku(nat)`` is the Nunchaku file (test-side packer) and
``arch_fixtures.to_native(nat)`` the ComfyUI-native int4 file the converter must produce from it, bit for
bit (keys, dtypes, values, each layer's JSON). Checked for the in-memory converter, the streaming file
converter and ``comfy.quant.host.prepare_state_dict`` (the direct-load path), for every fixture variant;
plus the hazard warning on folded smoothing, the errors (missing tensor / part, wrong shape, dtype or
value: module and tensor named, nothing consumed), detection without metadata, and the architecture tables
against the fixture's plan. ``linear2``'s K-split layer is compared as tensors and JSON, not run.
"""
from __future__ import annotations

import functools
import json
import logging
import os

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file, save_file

import arch_fixtures as A
from factories import partial_files
from comfy.quant import architectures as AR
from comfy.quant import host
from comfy.quant import nunchaku as nk
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file

from arch_fixtures import VARIANTS, bits_equal, decode_json  # noqa: E402


SEED = 3   # test_arch_fixtures' seed: natural_int4's cache is shared within one pytest run


@functools.lru_cache(maxsize=None)
def _built(variant):
    """(nat, Nunchaku state dict, its metadata, native state dict, its metadata), built once per variant (the
    fixture's packers are slow); callers get fresh dicts and must not modify the tensors in place."""
    arch, cfg = VARIANTS[variant]
    nat = A.natural_int4(arch, cfg, seed=SEED)
    sd, meta = A.to_nunchaku(nat)
    want, want_meta = A.to_native(nat)
    return nat, sd, meta, want, want_meta


class _Nats(dict):
    def __missing__(self, variant):
        return _built(variant)[0]


@pytest.fixture(scope="module")
def nats():
    return _Nats()


def _variant_of(nat):
    return next(v for v, (arch, cfg) in VARIANTS.items()
                if arch == nat["arch"] and nat["cfg"] == A._cfg(arch, cfg))


def nunchaku_file(nat):
    _, sd, meta, _, _ = _built(_variant_of(nat))
    return dict(sd), dict(meta)


def assert_native(got: dict, got_meta: dict, nat: dict):
    """``got`` (state dict, metadata) is ``to_native(nat)``: same keys, every tensor bit-equal (comfy_quant as
    JSON: the converter writes sorted keys), the header's layers the layers' JSON, the config kept."""
    _, _, meta, want, want_meta = _built(_variant_of(nat))
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    layers = {}
    for key, t in want.items():
        if key.endswith(".comfy_quant"):
            assert got[key].dtype == torch.uint8, key
            assert decode_json(got[key]) == decode_json(t), key
            layers[key[: -len(".comfy_quant")]] = decode_json(t)
        else:
            assert bits_equal(t, got[key]), key
    header = json.loads(got_meta["_quantization_metadata"])
    assert header == {"format_version": "1.0", "layers": layers}
    assert got_meta["config"] == want_meta["config"]
    source = json.loads(got_meta["converted_from"])
    assert source["format"] == "nunchaku" and source["model_class"] == meta["model_class"]
    assert source["quantization_config"] == json.loads(meta["quantization_config"])
    if "comfy_config" in meta:
        assert source["comfy_config"] == json.loads(meta["comfy_config"])


# ============================================================================ exactness

@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_conversion_is_the_native_file(variant, nats):
    nat = nats[variant]
    sd, meta = nunchaku_file(nat)
    got, got_meta = nk.convert_nunchaku_state_dict(sd, meta)
    assert sd == {}   # consumed as it goes
    assert_native(got, got_meta, nat)


@pytest.mark.parametrize("variant", VARIANTS)
def test_file_conversion_is_the_same_file(variant, nats, tmp_path):
    """Streamed from safe_open into the output, the file holds exactly the in-memory result (and the oracle)."""
    nat = nats[variant]
    sd, meta = nunchaku_file(nat)
    src, dst = tmp_path / "svdq-int4_r32-tiny.safetensors", tmp_path / "tiny-native.safetensors"
    save_file(sd, str(src), metadata=meta)
    file_meta = convert_nunchaku_file(str(src), str(dst), progress=False)
    assert not partial_files(dst.parent)
    mem, mem_meta = nk.convert_nunchaku_state_dict(sd, meta)
    from_file = load_file(str(dst))
    assert set(from_file) == set(mem)
    for key, t in mem.items():
        assert bits_equal(t, from_file[key]), key
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == mem_meta == file_meta
    assert_native(from_file, file_meta, nat)


@pytest.mark.parametrize("variant", VARIANTS)
def test_direct_load_path(variant, nats):
    """``host.prepare_state_dict`` (what a loader calls on a Nunchaku file) gives the same tensors."""
    nat = nats[variant]
    sd, meta = nunchaku_file(nat)
    got, got_meta = host.prepare_state_dict(sd, meta)
    assert_native(got, got_meta, nat)


def test_flux_single_block_layers(nats):
    """linear1 = [qkv_proj; mlp_fc1] at rank 2R (block-diagonal proj_up); linear2 = [out_proj | mlp_fc2] along
    K at rank 2R with the per-segment signedness and the split in its JSON; modulation de-interleaved S=3."""
    nat = nats["flux-dev"]
    cfg = nat["cfg"]
    d, m, r = cfg.hidden_size, cfg.mlp_hidden, cfg.rank
    sd, meta = nunchaku_file(nat)
    got, got_meta = nk.convert_nunchaku_state_dict(sd, meta)
    layers = json.loads(got_meta["_quantization_metadata"])["layers"]
    assert layers["single_blocks.0.linear1"] == {"act_unsigned": False, "format": "svdquant_w4a4",
                                                 "group_size": 64, "rank": 2 * r}
    assert layers["single_blocks.0.linear2"] == {"act_unsigned": [False, True], "format": "svdquant_w4a4",
                                                 "group_size": 64, "in_splits": [d, m], "rank": 2 * r}
    assert layers["single_blocks.0.modulation.lin"] == {"format": "awq_w4a16", "group_size": 64}
    assert layers["double_blocks.0.img_mlp.2"]["act_unsigned"] is True
    assert layers["double_blocks.0.img_mlp.0"]["act_unsigned"] is False
    up1 = got["single_blocks.0.linear1.weight_proj_up"]
    assert up1.shape == (3 * d + m, 2 * r) and not up1[:3 * d, r:].any() and not up1[3 * d:, :r].any()
    down2 = got["single_blocks.0.linear2.weight_proj_down"]
    assert down2.shape == (d + m, 2 * r) and not down2[:d, r:].any() and not down2[d:, :r].any()
    assert got["single_blocks.0.linear2.weight"].shape == (d, (d + m) // 2)
    assert got["single_blocks.0.linear2.weight_scale"].shape == ((d + m) // 64, d)
    want = nat["w4a4"]["single_transformer_blocks.0.mlp_fc2"]["bias"]   # out_proj's bias is zero
    assert bits_equal(want, got["single_blocks.0.linear2.bias"])
    assert "norm_out.linear.weight" not in got and "final_layer.adaLN_modulation.1.weight" in got


def test_zimage_w13_split_order(nats):
    """feed_forward.net.0.proj is [w3; w1]: w3 gets rows 0..F, w1 rows F..2F, both the module's proj_down and
    smooth factor; attention.to_qkv stays fused as attention.qkv; no biases."""
    nat = nats["zimage"]
    f = nat["cfg"].ffn_hidden
    e = nat["w4a4"]["layers.0.feed_forward.net.0.proj"]
    sd, meta = nunchaku_file(nat)
    got, _ = nk.convert_nunchaku_state_dict(sd, meta)
    import nunchaku_packer as P
    assert torch.equal(got["layers.0.feed_forward.w3.weight"], P.kitchen_pack(e["codes"][:f]))
    assert torch.equal(got["layers.0.feed_forward.w1.weight"], P.kitchen_pack(e["codes"][f:]))
    for layer in ("w1", "w3"):
        assert bits_equal(e["weight_proj_down"], got[f"layers.0.feed_forward.{layer}.weight_proj_down"])
        assert bits_equal(e["weight_smooth_factor"], got[f"layers.0.feed_forward.{layer}.weight_smooth_factor"])
    assert got["layers.0.attention.qkv.weight"].shape == (3 * 384, 384 // 2)
    assert not [k for k in got if k.endswith(".bias") and (".attention." in k or ".feed_forward." in k)]
    # the float refiners: diffusers layout -> ComfyUI's (to_q/k/v concatenated, [w3; w1] split)
    fl = A.comfy_float_state_dict("zimage", seed=SEED)
    for key in ("noise_refiner.0.attention.qkv.weight", "context_refiner.1.feed_forward.w1.weight",
                "context_refiner.1.feed_forward.w3.weight", "noise_refiner.1.attention.out.weight",
                "x_embedder.weight", "final_layer.adaLN_modulation.1.bias", "layers.1.attention.q_norm.weight"):
        assert bits_equal(fl[key], got[key]), key


# ============================================================================ hazards

def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "smooth_factor_orig" in r.getMessage()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_folded_smoothing_warned(variant, nats, caplog):
    """deepcompressor folds every Flux out_proj*'s smoothing into the V rows (smooth = 1, smooth_orig not):
    one warning per such module naming it and its ComfyUI layer; none where nothing is folded."""
    nat = nats[variant]
    sd, meta = nunchaku_file(nat)
    with caplog.at_level(logging.WARNING, logger="comfy.quant.nunchaku"):
        nk.convert_nunchaku_state_dict(sd, meta)
    msgs = _warnings(caplog)
    if variant != "flux-dev":
        assert not msgs, msgs
        return
    folded = {m for m in nat["w4a4"] if ".out_proj" in m}
    assert len(msgs) == len(folded) == 2 * 2 + 2
    for mod in folded:
        assert any(f"'{mod}'" in msg for msg in msgs), mod
    assert any("'single_blocks.0.linear2'" in msg for msg in msgs)
    assert any("'double_blocks.1.txt_attn.proj'" in msg for msg in msgs)


# ============================================================================ errors

def _refused(sd, meta, pattern):
    keys = set(sd)
    with pytest.raises(nk.NunchakuConversionError, match=pattern) as exc:
        nk.convert_nunchaku_state_dict(sd, meta)
    return exc.value, keys


@pytest.mark.parametrize("variant,key,pattern", [
    ("zimage", "layers.1.feed_forward.net.0.proj.proj_up",
     r"module 'layers\.1\.feed_forward\.net\.0\.proj', tensor 'proj_up': expected present, got missing"),
    ("flux-dev", "single_transformer_blocks.1.mlp_fc2.smooth",
     r"module 'single_transformer_blocks\.1\.mlp_fc2', tensor 'smooth_factor': expected present"),
    ("flux-dev", "transformer_blocks.0.norm1_context.linear.bias",
     r"module 'transformer_blocks\.0\.norm1_context\.linear', tensor 'bias': expected present"),
    ("zimage", "context_refiner.0.attention.to_k.weight",
     r"module 'context_refiner\.0\.attention\.to_k', tensor 'weight': expected present .*"
     r"'context_refiner\.0\.attention\.qkv\.weight'"),
])
def test_missing_tensor_named(variant, key, pattern, nats):
    sd, meta = nunchaku_file(nats[variant])
    del sd[key]
    _, keys = _refused(sd, meta, pattern)
    assert set(sd) == keys   # refused before anything was consumed


def test_missing_concatenation_part_named(nats):
    """A single block without its mlp_fc1: linear1 cannot be made; the missing part is named."""
    sd, meta = nunchaku_file(nats["flux-dev"])
    for k in [k for k in sd if k.startswith("single_transformer_blocks.0.mlp_fc1.")]:
        del sd[k]
    _refused(sd, meta, r"module 'single_transformer_blocks\.0\.mlp_fc1', tensor 'qweight': expected present "
                       r"\(part 2 of 2 of 'single_blocks\.0\.linear1'")


@pytest.mark.parametrize("variant,key,axis,cut,pattern", [
    ("zimage", "layers.0.attention.to_out.0.wscales", 0, 2,
     r"module 'layers\.0\.attention\.to_out\.0', tensor 'wscales': expected shape \(6, 384\), got shape \(2, 384\)"),
    ("flux-dev", "single_transformer_blocks.0.out_proj.lora_up", 1, 16,
     r"module 'single_transformer_blocks\.0\.out_proj', tensor 'proj_up': expected shape \(256, 32\), got shape "
     r"\(256, 16\)"),
    ("flux-dev", "transformer_blocks.1.norm1.linear.wzeros", 0, 1,
     r"module 'transformer_blocks\.1\.norm1\.linear', tensor 'wzeros': expected shape \(4, 1536\) or padded"),
])
def test_wrong_shape_named(variant, key, axis, cut, pattern, nats):
    sd, meta = nunchaku_file(nats[variant])
    sd[key] = sd[key].narrow(axis, 0, cut).contiguous()
    _refused(sd, meta, pattern)


def test_zimage_refiner_float_shape_named(nats):
    sd, meta = nunchaku_file(nats["zimage"])
    sd["noise_refiner.0.attention.to_v.weight"] = sd["noise_refiner.0.attention.to_v.weight"][:, :128].contiguous()
    _refused(sd, meta, r"module 'noise_refiner\.0\.attention\.to_v', tensor 'weight': expected torch\.bfloat16 "
                       r"\(\*, 384\)")


def test_concatenated_parts_must_agree(nats):
    """linear1's parts share one smooth factor and one dtype; linear2's parts one output width."""
    nat = nats["flux-dev"]
    sd, meta = nunchaku_file(nat)
    sd["single_transformer_blocks.1.mlp_fc1.smooth"] = sd["single_transformer_blocks.1.mlp_fc1.smooth"] * 2
    _refused(sd, meta, r"module 'single_transformer_blocks\.1\.mlp_fc1', tensor 'smooth_factor': expected the "
                       r"smooth_factor of 'single_transformer_blocks\.1\.qkv_proj'")
    sd, meta = nunchaku_file(nat)
    sd["single_transformer_blocks.0.mlp_fc1.lora_up"] = sd["single_transformer_blocks.0.mlp_fc1.lora_up"].half()
    _refused(sd, meta, r"module 'single_transformer_blocks\.0\.mlp_fc1', tensor 'proj_up': expected dtype "
                       r"torch\.bfloat16")


@pytest.mark.parametrize("variant,key,tensor", [
    ("zimage", "layers.0.feed_forward.net.2.wscales", "wscales"),
    ("flux-dev", "single_transformer_blocks.0.mlp_fc2.lora_down", "proj_down"),
    ("flux-dev", "transformer_blocks.0.norm1.linear.wscales", "wscales"),
])
def test_non_finite_values_named(variant, key, tensor, nats):
    sd, meta = nunchaku_file(nats[variant])
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float("nan")
    module = key.rpartition(".")[0]
    _refused(sd, meta, rf"module '{module}', tensor '{tensor}'")


def test_zero_smooth_refused(nats):
    sd, meta = nunchaku_file(nats["flux-dev"])
    sd["single_transformer_blocks.0.mlp_fc2.smooth"] = torch.zeros_like(sd["single_transformer_blocks.0.mlp_fc2.smooth"])
    _refused(sd, meta, r"module 'single_transformer_blocks\.0\.mlp_fc2', tensor 'smooth_factor'")


def test_unknown_module_named(nats):
    sd, meta = nunchaku_file(nats["zimage"])
    for s in ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up"):
        sd[f"layers.0.feed_forward.w9.{s}"] = sd[f"layers.0.feed_forward.net.2.{s}"]
    _refused(sd, meta, r"module 'layers\.0\.feed_forward\.w9', tensor 'qweight': expected a Z-Image SVDQuant W4A4 "
                       r"layer under layers\.N\.\{attention\.to_qkv")


def test_awq_where_the_table_has_none(nats):
    sd, meta = nunchaku_file(nats["zimage"])
    sd["layers.0.adaLN_modulation.0.qweight"] = torch.zeros(384, 128, dtype=torch.int32)
    sd["layers.0.adaLN_modulation.0.wscales"] = torch.zeros(16, 1536, dtype=torch.bfloat16)
    sd["layers.0.adaLN_modulation.0.wzeros"] = torch.zeros(16, 1536, dtype=torch.bfloat16)
    _refused(sd, meta, r"module 'layers\.0\.adaLN_modulation\.0', tensor 'wzeros': expected AWQ W4A16 only on "
                       r"nowhere \(Z-Image has none\)")


def test_output_collision_refused(nats):
    """A float tensor that would land on a converted layer's tensor is refused before any work."""
    sd, meta = nunchaku_file(nats["zimage"])
    sd["layers.0.attention.out.weight"] = torch.zeros(384, 384, dtype=torch.bfloat16)
    _, keys = _refused(sd, meta, r"'layers\.0\.attention\.out\.weight'")
    assert set(sd) == keys


def test_file_errors_name_the_file(nats, tmp_path):
    sd, meta = nunchaku_file(nats["flux-dev"])
    del sd["single_transformer_blocks.1.out_proj.lora_down"]
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src), metadata=meta)
    with pytest.raises(nk.NunchakuConversionError, match=r"single_transformer_blocks\.1\.out_proj.*'proj_down'") as exc:
        convert_nunchaku_file(str(src), str(dst), progress=False)
    assert str(src) in str(exc.value)
    assert not dst.exists() and not partial_files(dst.parent)


def test_value_problems_reports_each_module(nats):
    """inspect's path: every refused module reported (not raised), per Nunchaku module."""
    sd, meta = nunchaku_file(nats["flux-dev"])
    for key in ("single_transformer_blocks.0.mlp_fc2.wscales", "single_transformer_blocks.0.out_proj.wscales"):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("inf")
    problems, _ = nk.value_problems(sd.keys(), meta, lambda k: tuple(sd[k].shape), sd.__getitem__)
    assert len(problems) == 2
    assert any("single_transformer_blocks.0.mlp_fc2" in p for p in problems)
    assert any("single_transformer_blocks.0.out_proj" in p for p in problems)


# ============================================================================ detection

@pytest.mark.parametrize("variant", ["zimage", "flux-dev"])
def test_detected_from_keys_without_metadata(variant, nats, caplog):
    """No metadata: the architecture comes from the key names; the tensors are the same (Flux's AWQ widths are
    checked against the inner dim read from x_embedder.weight, with a warning)."""
    nat = nats[variant]
    sd, meta = nunchaku_file(nat)
    with caplog.at_level(logging.WARNING, logger="comfy.quant.nunchaku"):
        got, got_meta = nk.convert_nunchaku_state_dict(sd, None)
    want = _built(variant)[3]
    assert set(got) == set(want)
    assert all(bits_equal(want[k], got[k]) for k in want if not k.endswith(".comfy_quant"))
    assert "config" not in got_meta
    if variant == "flux-dev":
        assert any("inner dim 256 taken from x_embedder.weight" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("variant", VARIANTS)
def test_check_convertible_counts(variant, nats):
    nat = nats[variant]
    sd, meta = nunchaku_file(nat)
    counts = nk.check_convertible(sd.keys(), meta, lambda k: tuple(sd[k].shape))
    layers = A.native_layers(nat)
    n_awq = sum(1 for _, conf in layers.values() if conf["format"] == "awq_w4a16")
    assert counts.get("awq", 0) == n_awq
    # one unit per Nunchaku W4A4 module, except the concatenations (two modules, one unit)
    n_cat = sum(1 for nl in A.plan(nat["arch"], nat["cfg"]).native.values() if nl.kind.startswith("cat_"))
    assert counts["w4a4"] == len(nat["w4a4"]) - n_cat
    assert len(sd) == len(_built(variant)[1])   # nothing consumed


# ============================================================================ the tables

@pytest.mark.parametrize("variant", VARIANTS)
def test_tables_agree_with_the_fixture_plan(variant):
    arch_name, cfg = VARIANTS[variant]
    arch = AR.get(arch_name)
    pl = A.plan(arch_name, cfg)
    shapes = A.comfy_shapes(arch_name, cfg)
    assert AR.from_comfy_keys(shapes) is arch
    assert AR.from_model_class(A.nunchaku_metadata(arch_name, cfg)["model_class"]) is arch
    for name, nl in pl.native.items():
        found = arch.comfy_layer(name)
        assert found is not None, name
        kind, _, rel, layer = found
        assert layer.kind == (AR.AWQ if nl.kind == "awq" else AR.SVDQUANT), name
        for src in nl.sources:   # the Nunchaku-side table sends the fixture's source modules to this layer
            nkind, _, cblock, nrel = arch.nunchaku_block(src)
            assert nkind is kind and name in [f"{cblock}.{t}" for t in kind.modules[nrel].targets], (src, name)
        if nl.kind == "awq":
            spec = pl.awq[nl.sources[0]]
            assert (layer.interleave, layer.scale_slots) == (spec.s, tuple(spec.scale_slots))
        elif nl.kind == "cat_in":
            assert layer.act_unsigned == tuple(pl.w4a4[s].act_unsigned for s in nl.sources)
            assert layer.input_splits(pl.w4a4[nl.sources[0]].n, sum(pl.w4a4[s].k for s in nl.sources)) == tuple(
                pl.w4a4[s].k for s in nl.sources)
        else:
            assert layer.act_unsigned == pl.w4a4[nl.sources[0]].act_unsigned, name
    # every int4 layer of the ComfyUI-side table is in the fixture's file, except released-float blocks
    for key in shapes:
        if key.endswith(".weight") and (found := arch.comfy_layer(key[: -len(".weight")])) and found[3].kind != AR.FLOAT:
            assert key[: -len(".weight")] in pl.native or (found[0].released_float and cfg is None), key


def test_qwen_image_table_unchanged():
    """The Qwen-Image tables moved from nunchaku.py / quantizer.py unchanged."""
    kind = AR.QWEN_IMAGE.blocks[0]
    assert kind.modules["attn.to_qkv"].targets == ("attn.to_q", "attn.to_k", "attn.to_v")
    assert kind.modules["attn.add_qkv_proj"].targets == ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
    assert {r for r, layer in kind.layers.items() if layer.act_unsigned} == {"img_mlp.net.2", "txt_mlp.net.2"}
    assert {r: (layer.interleave, layer.scale_slots) for r, layer in kind.layers.items() if layer.kind == AR.AWQ} == {
        "img_mod.1": (6, (1, 4)), "txt_mod.1": (6, (1, 4))}
    assert kind.share_group("attn.to_k") == ("attn.to_q", "attn.to_k", "attn.to_v")
    assert AR.from_comfy_keys(["transformer_blocks.0.attn.to_q.weight", "txt_norm.weight"]) is AR.QWEN_IMAGE
    assert AR.from_comfy_keys(["double_stream_modulation_img.lin.weight", "img_in.weight",
                               "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) is None
    assert AR.ZIMAGE.blocks[0].share_group("feed_forward.w1") == ("feed_forward.w3", "feed_forward.w1")
    with pytest.raises(KeyError, match="known: qwen_image, zimage, flux"):
        AR.get("sdxl")

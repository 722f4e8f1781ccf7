"""LoRA key mapping, loading and dense merging on a tiny Qwen-Image-named module tree."""
import logging

import pytest
import torch
from torch import nn

import comfy.lora
from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter, WeightAdapterBase, adapters

D = 8  # inner dim
HD = 4  # head dim
R = 2  # LoRA rank


# ------------------------------------------------------------------------------ tiny model
class _Attn(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        if fused:
            self.to_qkv = nn.Linear(D, 3 * D)
        else:
            self.to_q = nn.Linear(D, D)
            self.to_k = nn.Linear(D, D)
            self.to_v = nn.Linear(D, D)
        self.add_q_proj = nn.Linear(D, D)
        self.add_k_proj = nn.Linear(D, D)
        self.add_v_proj = nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(D, D)
        self.norm_q = nn.RMSNorm(HD, eps=1e-6)
        self.norm_k = nn.RMSNorm(HD, eps=1e-6)
        self.norm_added_q = nn.RMSNorm(HD, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(HD, eps=1e-6)


class _GELUProj(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.proj = nn.Linear(a, b)


class _FF(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(D, 4 * D), nn.Dropout(0.0), nn.Linear(4 * D, D)])


class _Block(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.img_norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.txt_norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = _Attn(fused)
        self.img_mlp = _FF()
        self.txt_mlp = _FF()


class _Transformer(nn.Module):
    def __init__(self, fused=False, blocks=2):
        super().__init__()
        self.img_in = nn.Linear(16, D)
        self.txt_norm = nn.RMSNorm(12, eps=1e-6)
        self.txt_in = nn.Linear(12, D)
        self.transformer_blocks = nn.ModuleList([_Block(fused) for _ in range(blocks)])
        self.proj_out = nn.Linear(D, 16)
        if fused:
            self.lora_fused_targets = {
                "transformer_blocks.{}.attn.to_qkv".format(i): [
                    ("attn.to_q", 0, 0, D), ("attn.to_k", 0, D, D), ("attn.to_v", 0, 2 * D, D)]
                for i in range(blocks)
            }
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()


class _Wrapper:
    def __init__(self, dm):
        self.diffusion_model = dm


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _Wrapper(_Transformer())


@pytest.fixture(scope="module")
def key_map(model):
    return comfy.lora.model_lora_keys_unet(model, {})


def _weight(model, target):
    key = target[0] if isinstance(target, tuple) else target
    return model.diffusion_model.state_dict()[key[len("diffusion_model."):]]


def _apply(model, loaded, strength=1.0):
    """Dense merge of ``loaded`` into a copy of the model's state dict (as a model patcher would)."""
    sd = {"diffusion_model." + k: v.clone() for k, v in model.diffusion_model.state_dict().items()}
    for target, patch in loaded.items():
        key, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        sd[key] = comfy.lora.calculate_weight([(strength, patch, 1.0, offset, None)], sd[key], key)
    return sd


def _lora_factors(n, k, r=R, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g), torch.randn(r, k, generator=g)


# ---------------------------------------------------------------------------------- key map
PATHS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.attn.add_k_proj",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.img_mod.1",
    "transformer_blocks.1.txt_mod.1",
    "transformer_blocks.0.img_mlp.net.0.proj",
    "transformer_blocks.0.img_mlp.net.2",
    "transformer_blocks.0.attn.norm_q",
    "txt_norm",
    "img_in",
]


@pytest.mark.parametrize("path", PATHS)
def test_key_map_variants(key_map, path):
    target = "diffusion_model.{}.weight".format(path)
    flat = path.replace(".", "_")
    for prefix in (path, "transformer." + path, "diffusion_model." + path, "lora_unet_" + flat,
                   "lycoris_" + flat):
        assert key_map[prefix] == target, prefix


def test_key_map_bias_and_no_affine_norm(key_map):
    b = "diffusion_model.transformer_blocks.0.attn.to_q.bias"
    assert key_map[b] == b
    assert not any("img_norm1" in k for k in key_map)
    assert "diffusion_model.transformer_blocks.0.attn.to_qkv" not in key_map


# ------------------------------------------------------------------------------ LoRA namings
def _lora_sd(style, path, up, down, alpha=None):
    flat = path.replace(".", "_")
    if style == "diffusers":
        p, u, d = "transformer." + path, "lora_B.weight", "lora_A.weight"
    elif style == "kohya":
        p, u, d = "lora_unet_" + flat, "lora_up.weight", "lora_down.weight"
    elif style == "comfy":
        p, u, d = "diffusion_model." + path, "lora_up.weight", "lora_down.weight"
    elif style == "diffusers_dot":
        p, u, d = path, "lora.up.weight", "lora.down.weight"
    else:
        raise ValueError(style)
    sd = {"{}.{}".format(p, u): up, "{}.{}".format(p, d): down}
    if alpha is not None:
        sd[p + ".alpha"] = torch.tensor(float(alpha))
    return sd


@pytest.mark.parametrize("style,alpha", [("diffusers", None), ("diffusers", 1.0),
                                         ("kohya", 1.0), ("kohya", 8.0), ("comfy", None),
                                         ("comfy", 4.0), ("diffusers_dot", None)])
@pytest.mark.parametrize("path", ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mod.1",
                                  "transformer_blocks.0.img_mlp.net.0.proj"])
def test_lora_namings_load_and_scale(model, key_map, style, alpha, path):
    w = _weight(model, "diffusion_model.{}.weight".format(path))
    up, down = _lora_factors(w.shape[0], w.shape[1])
    lora = _lora_sd(style, path, up, down, alpha)
    not_loaded = []
    loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded)
    assert not_loaded == []
    target = "diffusion_model.{}.weight".format(path)
    assert list(loaded) == [target]
    ad = loaded[target]
    assert isinstance(ad, LoRAAdapter) and isinstance(ad, WeightAdapterBase)
    assert ad.dora_scale is None
    scale = 1.0 if alpha is None else alpha / R
    expected = scale * (up @ down)
    torch.testing.assert_close(ad.delta_weight(w.shape), expected)
    lr_up, lr_down, lr_scale = ad.low_rank()
    assert lr_up.shape == (w.shape[0], R) and lr_down.shape == (R, w.shape[1]) and lr_up.dtype == torch.float32
    assert lr_scale == pytest.approx(scale)
    torch.testing.assert_close(lr_scale * lr_up @ lr_down, ad.delta_weight(w.shape))
    # dense merge = W + s * ΔW
    merged = _apply(model, loaded, strength=0.7)[target]
    torch.testing.assert_close(merged, w + 0.7 * expected)


def test_loha_lycoris(model, key_map):
    path = "transformer_blocks.0.attn.add_v_proj"
    x = "lycoris_" + path.replace(".", "_")
    g = torch.Generator().manual_seed(1)
    w1a, w1b = torch.randn(D, R, generator=g), torch.randn(R, D, generator=g)
    w2a, w2b = torch.randn(D, R, generator=g), torch.randn(R, D, generator=g)
    alpha = 3.0
    lora = {x + ".hada_w1_a": w1a, x + ".hada_w1_b": w1b, x + ".hada_w2_a": w2a,
            x + ".hada_w2_b": w2b, x + ".alpha": torch.tensor(alpha)}
    not_loaded = []
    loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded)
    assert not_loaded == []
    target = "diffusion_model.{}.weight".format(path)
    ad = loaded[target]
    assert isinstance(ad, LoHaAdapter)
    assert ad.low_rank() is None
    expected = (w1a @ w1b) * (w2a @ w2b) * alpha / R
    torch.testing.assert_close(ad.delta_weight((D, D)), expected)
    w = _weight(model, target)
    torch.testing.assert_close(_apply(model, loaded, 0.5)[target], w + 0.5 * expected)


@pytest.mark.parametrize("form", ["full", "w2_factored", "w1_factored"])
def test_lokr_lycoris(model, key_map, form):
    path = "transformer_blocks.1.img_mlp.net.0.proj"  # (4D, D) = (32, 8)
    x = "lycoris_" + path.replace(".", "_")
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(4, 2, generator=g)
    w2 = torch.randn(8, 4, generator=g)
    alpha = 6.0
    lora = {x + ".alpha": torch.tensor(alpha)}
    if form == "full":
        lora.update({x + ".lokr_w1": w1, x + ".lokr_w2": w2})
        scale = 1.0  # alpha ignored when nothing is factorised (upstream)
    elif form == "w2_factored":
        a, b = torch.randn(8, 3, generator=g), torch.randn(3, 4, generator=g)
        w2 = a @ b
        lora.update({x + ".lokr_w1": w1, x + ".lokr_w2_a": a, x + ".lokr_w2_b": b})
        scale = alpha / 3
    else:
        a, b = torch.randn(4, 1, generator=g), torch.randn(1, 2, generator=g)
        w1 = a @ b
        lora.update({x + ".lokr_w1_a": a, x + ".lokr_w1_b": b, x + ".lokr_w2": w2})
        scale = alpha / 1
    not_loaded = []
    loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded)
    assert not_loaded == []
    target = "diffusion_model.{}.weight".format(path)
    ad = loaded[target]
    assert isinstance(ad, LoKrAdapter)
    assert ad.low_rank() is None
    expected = torch.kron(w1, w2) * scale
    assert ad.delta_shape() == (32, 8)
    torch.testing.assert_close(ad.delta_weight((32, 8)), expected)
    w = _weight(model, target)
    torch.testing.assert_close(_apply(model, loaded)[target], w + expected)


def test_adapters_export():
    assert adapters == [LoRAAdapter, LoHaAdapter, LoKrAdapter]


def test_lora_mid_folds_into_down():
    g = torch.Generator().manual_seed(3)
    out_c, in_c, k = 6, 5, 3
    up = torch.randn(out_c, R, 1, 1, generator=g)
    down = torch.randn(R, in_c, 1, 1, generator=g)
    mid = torch.randn(R, R, k, k, generator=g)
    x = "lora_unet_conv"
    lora = {x + ".lora_up.weight": up, x + ".lora_down.weight": down, x + ".lora_mid.weight": mid,
            x + ".alpha": torch.tensor(1.0)}
    keys = set()
    ad = LoRAAdapter.load(x, lora, 1.0, None, keys)
    assert keys == {x + ".lora_up.weight", x + ".lora_down.weight", x + ".lora_mid.weight"}
    # independent formula: conv 1x1 (down) -> conv kxk (mid) -> conv 1x1 (up)
    expected = torch.einsum("oa,abhw,bc->ochw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) / R
    torch.testing.assert_close(ad.delta_weight((out_c, in_c, k, k)), expected)
    u, d, s = ad.low_rank()
    assert u.shape == (out_c, R) and d.shape == (R, in_c * k * k)
    torch.testing.assert_close(s * u @ d, expected.reshape(out_c, -1))
    w = torch.randn(out_c, in_c, k, k)
    merged = comfy.lora.calculate_weight([(1.0, ad, 1.0, None, None)], w.clone(), "conv.weight")
    torch.testing.assert_close(merged, w + expected)


def test_bypass_h_matches_delta(model, key_map):
    up, down = _lora_factors(D, D, seed=4)
    lora = _lora_sd("kohya", "transformer_blocks.0.attn.to_v", up, down, alpha=1.0)
    ad = comfy.lora.load_lora(lora, key_map)["diffusion_model.transformer_blocks.0.attn.to_v.weight"]
    x = torch.randn(3, D)
    torch.testing.assert_close(ad.h(x), x @ ad.delta_weight((D, D)).T)


# ------------------------------------------------------------------------- strength / offsets
def test_calculate_weight_strength_model_and_stack():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(D, D, generator=g)
    up, down = _lora_factors(D, D, seed=6)
    ad = LoRAAdapter.load("x", {"x.lora_up.weight": up, "x.lora_down.weight": down}, 4.0, None)
    diff = torch.randn(D, D, generator=g)
    patches = [(0.5, ad, 0.9, None, None), (2.0, ("diff", (diff,)), 1.0, None, None)]
    out = comfy.lora.calculate_weight(patches, w.clone(), "k")
    torch.testing.assert_close(out, (w * 0.9 + 0.5 * (4.0 / R) * up @ down) + 2.0 * diff)


def test_fused_offsets_land_in_rows():
    torch.manual_seed(7)
    m = _Wrapper(_Transformer(fused=True))
    km = comfy.lora.model_lora_keys_unet(m)
    fused_key = "diffusion_model.transformer_blocks.0.attn.to_qkv.weight"
    assert km["transformer_blocks.0.attn.to_q"] == (fused_key, (0, 0, D))
    assert km["transformer.transformer_blocks.0.attn.to_k"] == (fused_key, (0, D, D))
    assert km["lora_unet_transformer_blocks_0_attn_to_v"] == (fused_key, (0, 2 * D, D))
    assert km["lycoris_transformer_blocks_1_attn_to_v"] == (
        "diffusion_model.transformer_blocks.1.attn.to_qkv.weight", (0, 2 * D, D))
    assert km["transformer_blocks.0.attn.to_qkv"] == fused_key  # a fused-model LoRA maps directly

    lora = {}
    factors = {}
    for i, name in enumerate(["to_k", "to_v"]):
        up, down = _lora_factors(D, D, seed=10 + i)
        factors[name] = up @ down
        lora.update(_lora_sd("diffusers", "transformer_blocks.0.attn." + name, up, down))
    bias_diff = torch.randn(D)
    lora["transformer.transformer_blocks.0.attn.to_k.diff_b"] = bias_diff
    not_loaded = []
    loaded = comfy.lora.load_lora(lora, km, not_loaded=not_loaded)
    assert not_loaded == []
    assert (fused_key, (0, D, D)) in loaded and (fused_key, (0, 2 * D, D)) in loaded
    bias_target = ("diffusion_model.transformer_blocks.0.attn.to_qkv.bias", (0, D, D))
    assert bias_target in loaded

    w0 = _weight(m, fused_key).clone()
    b0 = m.diffusion_model.transformer_blocks[0].attn.to_qkv.bias.detach().clone()
    sd = _apply(m, loaded)
    w1 = sd[fused_key]
    torch.testing.assert_close(w1[:D], w0[:D])  # q rows untouched
    torch.testing.assert_close(w1[D:2 * D], w0[D:2 * D] + factors["to_k"])
    torch.testing.assert_close(w1[2 * D:], w0[2 * D:] + factors["to_v"])
    b1 = sd["diffusion_model.transformer_blocks.0.attn.to_qkv.bias"]
    torch.testing.assert_close(b1[D:2 * D], b0[D:2 * D] + bias_diff)
    torch.testing.assert_close(b1[:D], b0[:D])


def test_add_fused_targets_helper():
    km = comfy.lora.add_fused_targets({}, "diffusion_model.a.qkv.weight",
                                      [("a.q", "transformer.a.q", 0, 0, 4), (["a.k", "lora_unet_a_k"], 0, 4, 4)])
    assert km == {"a.q": ("diffusion_model.a.qkv.weight", (0, 0, 4)),
                  "transformer.a.q": ("diffusion_model.a.qkv.weight", (0, 0, 4)),
                  "a.k": ("diffusion_model.a.qkv.weight", (0, 4, 4)),
                  "lora_unet_a_k": ("diffusion_model.a.qkv.weight", (0, 4, 4))}


# ------------------------------------------------------------------------ dense patch types
def test_diff_diff_b_and_set(model, key_map):
    x = "diffusion_model.transformer_blocks.0.attn.norm_k"
    d = torch.randn(HD)
    s = torch.randn(D, D)
    db = torch.randn(D)
    lora = {x + ".diff": d,
            "diffusion_model.transformer_blocks.0.attn.to_out.0.diff_b": db,
            "diffusion_model.transformer_blocks.0.attn.to_add_out.set_weight": s}
    not_loaded = []
    loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded)
    assert not_loaded == []
    sd0 = {"diffusion_model." + k: v for k, v in model.diffusion_model.state_dict().items()}
    sd = _apply(model, loaded)
    torch.testing.assert_close(sd[x + ".weight"], sd0[x + ".weight"] + d)
    bk = "diffusion_model.transformer_blocks.0.attn.to_out.0.bias"
    torch.testing.assert_close(sd[bk], sd0[bk] + db)
    torch.testing.assert_close(sd["diffusion_model.transformer_blocks.0.attn.to_add_out.weight"], s)


def test_dora(model, key_map):
    path = "transformer_blocks.0.txt_mod.1"
    w = _weight(model, "diffusion_model.{}.weight".format(path))
    up, down = _lora_factors(w.shape[0], w.shape[1], seed=8)
    lora = _lora_sd("comfy", path, up, down, alpha=1.0)
    mag = torch.rand(1, w.shape[1]) + 0.5
    lora["diffusion_model.{}.dora_scale".format(path)] = mag
    not_loaded = []
    loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded)
    assert not_loaded == []
    ad = loaded["diffusion_model.{}.weight".format(path)]
    assert ad.dora_scale is mag
    merged_w = w + (up @ down) / R
    expected = merged_w * (mag / merged_w.norm(dim=0, keepdim=True))
    out = _apply(model, loaded)["diffusion_model.{}.weight".format(path)]
    torch.testing.assert_close(out, expected)
    half = _apply(model, loaded, strength=0.5)["diffusion_model.{}.weight".format(path)]
    torch.testing.assert_close(half, w + 0.5 * (expected - w))


# ------------------------------------------------------------------------ reporting / errors
def test_unmatched_keys_reported(key_map, caplog):
    up, down = _lora_factors(D, D)
    lora = _lora_sd("diffusers", "transformer_blocks.0.attn.to_q", up, down)
    lora["transformer.not_a_module.lora_A.weight"] = down
    lora["transformer.not_a_module.lora_B.weight"] = up
    lora["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = down  # lora_B missing
    lora["lora_unet_transformer_blocks_0_attn_to_v.alpha"] = torch.tensor(1.0)  # alpha, no weights
    not_loaded = []
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded)
    assert list(loaded) == ["diffusion_model.transformer_blocks.0.attn.to_q.weight"]
    missing = {"transformer.not_a_module.lora_A.weight", "transformer.not_a_module.lora_B.weight",
               "transformer.transformer_blocks.0.attn.to_k.lora_A.weight",
               "lora_unet_transformer_blocks_0_attn_to_v.alpha"}
    assert set(not_loaded) == missing
    for k in missing:
        assert "lora key not loaded: {}".format(k) in caplog.text
    caplog.clear()
    nl = []
    with caplog.at_level(logging.WARNING):
        comfy.lora.load_lora(lora, key_map, log_missing=False, not_loaded=nl)
    assert set(nl) == missing and "lora key not loaded" not in caplog.text


def test_wrong_shape_skipped_others_applied(model, key_map, caplog):
    bad_up, bad_down = _lora_factors(D, D + 3, seed=20)  # K wrong for to_q (D, D)
    good_up, good_down = _lora_factors(D, D, seed=21)
    lora = _lora_sd("kohya", "transformer_blocks.0.attn.to_q", bad_up, bad_down, alpha=2.0)
    lora.update(_lora_sd("kohya", "transformer_blocks.0.attn.to_k", good_up, good_down, alpha=2.0))
    t_bad = "diffusion_model.transformer_blocks.0.attn.to_q.weight"
    t_good = "diffusion_model.transformer_blocks.0.attn.to_k.weight"
    loaded = comfy.lora.load_lora(lora, key_map)
    assert set(loaded) == {t_bad, t_good}
    assert not loaded[t_bad].shape_matches((D, D)) and loaded[t_good].shape_matches((D, D))
    with pytest.raises(ValueError):
        loaded[t_bad].delta_weight((D, D))
    # same number of elements, transposed: must still be refused rather than reshaped
    tr_up, tr_down = _lora_factors(D + 3, D, seed=22)
    lora_t = _lora_sd("comfy", "transformer_blocks.0.img_in_fake", tr_up, tr_down)
    ad_t = comfy.lora.load_lora(lora_t, {"diffusion_model.transformer_blocks.0.img_in_fake": "k"}, log_missing=False)["k"]
    w = torch.randn(D, D + 3)
    with caplog.at_level(logging.ERROR):
        out = comfy.lora.calculate_weight([(1.0, ad_t, 1.0, None, None)], w.clone(), "k")
    torch.testing.assert_close(out, w)
    caplog.clear()

    sd0 = {"diffusion_model." + k: v for k, v in model.diffusion_model.state_dict().items()}
    with caplog.at_level(logging.ERROR):
        sd = _apply(model, loaded)
    torch.testing.assert_close(sd[t_bad], sd0[t_bad])
    torch.testing.assert_close(sd[t_good], sd0[t_good] + (good_up @ good_down))  # alpha 2 / rank 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert t_bad in errors[0] and str((D, D)) in errors[0] and str((D, D + 3)) in errors[0]


def test_wrong_shape_with_offset_does_not_touch_other_rows():
    torch.manual_seed(9)
    m = _Wrapper(_Transformer(fused=True))
    km = comfy.lora.model_lora_keys_unet(m)
    up, down = _lora_factors(2 * D, D, seed=30)  # rows of q+k, written for a different model
    loaded = comfy.lora.load_lora(_lora_sd("diffusers", "transformer_blocks.0.attn.to_q", up, down), km)
    fused_key = "diffusion_model.transformer_blocks.0.attn.to_qkv.weight"
    w0 = _weight(m, fused_key).clone()
    torch.testing.assert_close(_apply(m, loaded)[fused_key], w0)


@pytest.mark.parametrize("part", ["to_q", "attn.to_q", "transformer_blocks.0.attn.to_q"])
def test_fused_part_name_forms(part):
    dm = _Transformer(fused=True, blocks=1)
    dm.lora_fused_targets = {"transformer_blocks.0.attn.to_qkv": [(part, 0, 0, D)]}
    km = comfy.lora.model_lora_keys_unet(_Wrapper(dm))
    assert km["transformer.transformer_blocks.0.attn.to_q"] == (
        "diffusion_model.transformer_blocks.0.attn.to_qkv.weight", (0, 0, D))


class _PackedLinear(nn.Module):
    """Stand-in for an int4 layer: packed integer weight plus float side tensors."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.zeros(D, D // 2, dtype=torch.uint8))
        self.wscales = nn.Parameter(torch.ones(D // 64 + 1, D), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(D), requires_grad=False)


def test_quantized_layer_side_tensors_not_mapped():
    dm = _Transformer(blocks=1)
    dm.transformer_blocks[0].attn.to_q = _PackedLinear()
    km = comfy.lora.model_lora_keys_unet(_Wrapper(dm))
    x = "transformer_blocks.0.attn.to_q"
    assert km["transformer." + x] == "diffusion_model.{}.weight".format(x)
    assert km["diffusion_model.{}.bias".format(x)] == "diffusion_model.{}.bias".format(x)
    assert "diffusion_model.{}.wscales".format(x) not in km

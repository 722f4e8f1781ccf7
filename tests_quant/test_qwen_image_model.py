"""Tests for comfy.ldm.qwen_image.model.QwenImageTransformer2DModel.

The main check compares the module (fp32) against an independent float64 reference written below
straight from the spec, in a deliberately different style: it reads raw tensors from the state
dict, patchifies with explicit index loops (circular padding by modulo indexing), applies RoPE by
complex multiplication, runs attention head by head with an explicit softmax and drops masked
keys instead of adding a large negative number.

Tolerance: atol = rtol = 1e-4 on outputs of magnitude ~1. The model runs in fp32 (unit roundoff
6e-8); two blocks of layer norms, attention and MLPs at width 64-256 accumulate a few hundred
roundings per output, i.e. errors of ~1e-6..1e-5, so 1e-4 passes with a 10x margin while any
structural mistake (wrong chunk order, wrong RoPE pairing, wrong position id) moves the output by
O(0.1..1).
"""
import math

import pytest
import torch

import comfy.ops
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

CFG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
           num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
ATOL = RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

def random_state_dict(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.state_dict().items():
        if value.numel() == 0:
            sd[key] = value.clone()
        elif key.endswith("norm_q.weight") or key.endswith("norm_k.weight") or "norm_added" in key \
                or key == "txt_norm.weight":
            sd[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith(".bias"):
            sd[key] = 0.1 * torch.randn(value.shape, generator=g)
        elif value.ndim == 2 and "embedding" not in key:
            sd[key] = torch.randn(value.shape, generator=g) / math.sqrt(value.shape[1])
        else:
            sd[key] = torch.randn(value.shape, generator=g)
    return sd


def build(seed=0, operations=comfy.ops.disable_weight_init, **kw):
    model = QwenImageTransformer2DModel(**{**CFG, **kw}, dtype=torch.float32, operations=operations)
    sd = random_state_dict(model, seed)
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd


def inputs(b=2, h=6, w=8, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 1, h, w, generator=g)
    t = torch.rand(b, generator=g)
    ctx = torch.randn(b, L, CFG["joint_attention_dim"], generator=g)
    return x, t, ctx


# ---------------------------------------------------------------------------------------------
# independent float64 reference
# ---------------------------------------------------------------------------------------------

def lin(sd, name, v):
    return v @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(v, eps=1e-6):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + eps)


def rms_norm(v, weight, eps=1e-6):
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * weight


def silu(v):
    return v / (1 + torch.exp(-v))


def gelu_tanh(v):
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def ref_tokens(latent, index):
    """One latent (C, 1, H, W) -> tokens (N, 4C) and positions [(t, h, w)] by explicit loops."""
    C, _, H, W = latent.shape
    hl, wl = (H + 1) // 2, (W + 1) // 2
    toks, pos = [], []
    for i in range(hl):
        for j in range(wl):
            feat = [latent[c, 0, (2 * i + dy) % H, (2 * j + dx) % W]  # circular padding
                    for c in range(C) for dy in range(2) for dx in range(2)]
            toks.append(torch.stack(feat))
            pos.append((index, i - hl // 2, j - wl // 2))
    return torch.stack(toks), pos


def ref_untokens(tokens, C, H, W):
    out = torch.zeros(C, 1, H, W, dtype=tokens.dtype)
    wl = (W + 1) // 2
    for n in range(tokens.shape[0]):
        i, j = divmod(n, wl)
        for c in range(C):
            for dy in range(2):
                for dx in range(2):
                    y, xx = 2 * i + dy, 2 * j + dx
                    if y < H and xx < W:
                        out[c, 0, y, xx] = tokens[n, c * 4 + dy * 2 + dx]
    return out


def ref_rope(v, positions, axes=CFG["axes_dims_rope"]):
    """v (S, H, D) real -> rotated, via complex multiplication of channel pairs."""
    S, nh, D = v.shape
    vc = torch.complex(v[..., 0::2], v[..., 1::2])  # (S, H, D/2)
    angles = torch.zeros(S, D // 2, dtype=torch.float64)
    for s, p in enumerate(positions):
        col = 0
        for a, d in enumerate(axes):
            for j in range(d // 2):
                angles[s, col] = p[a] * 10000.0 ** (-2.0 * j / d)
                col += 1
    rot = vc * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    out = torch.empty_like(v)
    out[..., 0::2] = rot.real
    out[..., 1::2] = rot.imag
    return out


def ref_temb(sd, t):
    k = torch.arange(128, dtype=torch.float64)
    arg = 1000.0 * t * torch.exp(-math.log(10000.0) * k / 128)
    e = torch.cat([torch.cos(arg), torch.sin(arg)])
    e = lin(sd, "time_text_embed.timestep_embedder.linear_1", e)
    return lin(sd, "time_text_embed.timestep_embedder.linear_2", silu(e))


def reference_forward(sd, x, t, ctx, keep=None, refs=(), timestep_zero=False, t_cond=None):
    """Batch loop around a single-sample forward. keep: (B, L) bools of unmasked text tokens."""
    sd = {k: v.double() for k, v in sd.items()}
    nh, hd = CFG["num_attention_heads"], CFG["attention_head_dim"]
    outs = []
    for b in range(x.shape[0]):
        img, pos = ref_tokens(x[b].double(), 0)
        n_main = img.shape[0]
        for r, ref in enumerate(refs):
            rt, rp = ref_tokens(ref[b].double(), r + 1)
            img, pos = torch.cat([img, rt]), pos + rp
        H, W = x.shape[-2:]
        L = ctx.shape[1]
        start = max(((W + 1) // 2) // 2, ((H + 1) // 2) // 2)
        positions = [(start + i,) * 3 for i in range(L)] + pos

        temb = ref_temb(sd, float(t[b]))
        if t_cond is not None:
            temb = temb + sd["time_text_embed.addition_t_embedding.weight"][int(t_cond[b])]
        temb_ref = ref_temb(sd, 0.0) if (timestep_zero and refs) else temb
        keys_ok = torch.ones(L + img.shape[0], dtype=torch.bool)
        if keep is not None:
            keys_ok[:L] = keep[b]

        h = lin(sd, "img_in", img)
        c = lin(sd, "txt_in", rms_norm(ctx[b].double(), sd["txt_norm.weight"]))
        for i in range(CFG["num_layers"]):
            p = f"transformer_blocks.{i}."
            im = lin(sd, p + "img_mod.1", silu(temb))
            im_ref = lin(sd, p + "img_mod.1", silu(temb_ref))
            tm = lin(sd, p + "txt_mod.1", silu(temb))
            # per-token image modulation params: [shift1, scale1, gate1, shift2, scale2, gate2]
            im_tok = torch.stack([im if n < n_main else im_ref for n in range(h.shape[0])])
            ish, isc, ig, ish2, isc2, ig2 = im_tok.chunk(6, dim=-1)
            tsh, tsc, tg, tsh2, tsc2, tg2 = tm.chunk(6)

            hi = layer_norm(h) * (1 + isc) + ish
            ci = layer_norm(c) * (1 + tsc) + tsh
            q = torch.cat([lin(sd, p + "attn.add_q_proj", ci), lin(sd, p + "attn.to_q", hi)]).view(-1, nh, hd)
            k = torch.cat([lin(sd, p + "attn.add_k_proj", ci), lin(sd, p + "attn.to_k", hi)]).view(-1, nh, hd)
            v = torch.cat([lin(sd, p + "attn.add_v_proj", ci), lin(sd, p + "attn.to_v", hi)]).view(-1, nh, hd)
            q = torch.cat([rms_norm(q[:L], sd[p + "attn.norm_added_q.weight"]),
                           rms_norm(q[L:], sd[p + "attn.norm_q.weight"])])
            k = torch.cat([rms_norm(k[:L], sd[p + "attn.norm_added_k.weight"]),
                           rms_norm(k[L:], sd[p + "attn.norm_k.weight"])])
            q, k = ref_rope(q, positions), ref_rope(k, positions)
            heads = []
            for head in range(nh):
                scores = q[:, head] @ k[keys_ok, head].T / math.sqrt(hd)
                prob = torch.exp(scores - scores.max(-1, keepdim=True).values)
                prob = prob / prob.sum(-1, keepdim=True)
                heads.append(prob @ v[keys_ok, head])
            o = torch.cat(heads, dim=-1)
            h = h + ig * lin(sd, p + "attn.to_out.0", o[L:])
            c = c + tg * lin(sd, p + "attn.to_add_out", o[:L])

            h = h + ig2 * lin(sd, p + "img_mlp.net.2",
                              gelu_tanh(lin(sd, p + "img_mlp.net.0.proj", layer_norm(h) * (1 + isc2) + ish2)))
            c = c + tg2 * lin(sd, p + "txt_mlp.net.2",
                              gelu_tanh(lin(sd, p + "txt_mlp.net.0.proj", layer_norm(c) * (1 + tsc2) + tsh2)))

        scale, shift = lin(sd, "norm_out.linear", silu(temb)).chunk(2)  # scale first
        h = layer_norm(h[:n_main]) * (1 + scale) + shift
        outs.append(ref_untokens(lin(sd, "proj_out", h), 16, H, W))
    return torch.stack(outs)


def assert_close(a, b):
    torch.testing.assert_close(a.double(), b.double(), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(6, 8), (5, 7)])
def test_forward_matches_reference(hw):
    model, sd = build()
    x, t, ctx = inputs(h=hw[0], w=hw[1])
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert_close(out, reference_forward(sd, x, t, ctx))


def test_odd_hw_pads_and_crops():
    model, _ = build()
    for h, w in [(3, 5), (7, 4), (1, 1)]:
        x, t, ctx = inputs(b=1, h=h, w=w)
        with torch.no_grad():
            assert model(x, t, ctx).shape == (1, 16, 1, h, w)


def test_4d_input_matches_5d():
    model, _ = build()
    x, t, ctx = inputs()
    with torch.no_grad():
        out5 = model(x, t, ctx)
        out4 = model(x[:, :, 0], t, ctx)
    assert out4.shape == x[:, :, 0].shape
    torch.testing.assert_close(out4, out5[:, :, 0], atol=0, rtol=0)


def test_attention_mask_hides_masked_text():
    model, sd = build()
    x, t, ctx = inputs(L=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    noisy = ctx.clone()
    noisy[mask == 0] = 100 * torch.randn_like(noisy[mask == 0])
    with torch.no_grad():
        out = model(x, t, ctx, attention_mask=mask)
        out_noisy = model(x, t, noisy, attention_mask=mask)
        out_bool = model(x, t, ctx, attention_mask=mask.bool())
        out_trunc = model(x[:1], t[:1], ctx[:1, :4])
    torch.testing.assert_close(out, out_noisy, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, out_bool, atol=0, rtol=0)
    # masking the tail is the same as not having it (text positions do not depend on L)
    torch.testing.assert_close(out[:1], out_trunc, atol=1e-5, rtol=1e-5)
    assert_close(out, reference_forward(sd, x, t, ctx, keep=mask.bool()))
    # and the mask really matters
    assert (model(x, t, ctx).detach() - out).abs().max() > 1e-3


def test_ref_latents_index_method():
    model, sd = build()
    x, t, ctx = inputs()
    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(2, 16, 1, 6, 8, generator=g), torch.randn(2, 16, 1, 4, 5, generator=g)]
    with torch.no_grad():
        out = model(x, t, ctx, ref_latents=refs)
        plain = model(x, t, ctx)
    assert out.shape == x.shape
    assert (out - plain).abs().max() > 1e-3
    assert_close(out, reference_forward(sd, x, t, ctx, refs=refs))


def test_index_timestep_zero():
    model, sd = build(default_ref_method="index_timestep_zero")
    assert "__index_timestep_zero__" in model.state_dict()
    assert model.state_dict()["__index_timestep_zero__"].numel() == 0
    x, t, ctx = inputs()
    refs = [torch.randn(2, 16, 1, 6, 8, generator=torch.Generator().manual_seed(7))]
    rows = {"img": [], "txt": []}
    blk = model.transformer_blocks[0]
    blk.img_mod[1].register_forward_hook(lambda m, i, o: rows["img"].append(i[0].shape[0]))
    blk.txt_mod[1].register_forward_hook(lambda m, i, o: rows["txt"].append(i[0].shape[0]))
    with torch.no_grad():
        out = model(x, t, ctx, ref_latents=refs)
        assert rows == {"img": [4], "txt": [2]}
        model(x, t, ctx)  # no references: no doubling
        assert rows == {"img": [4, 2], "txt": [2, 2]}
    assert_close(out, reference_forward(sd, x, t, ctx, refs=refs, timestep_zero=True))
    # differs from the plain index method on the same weights
    plain = QwenImageTransformer2DModel(**CFG, dtype=torch.float32)
    plain.load_state_dict({k: v for k, v in sd.items() if k != "__index_timestep_zero__"})
    with torch.no_grad():
        assert (plain(x, t, ctx, ref_latents=refs) - out).abs().max() > 1e-3


def test_additional_t_cond():
    model, sd = build(use_additional_t_cond=True)
    assert sd["time_text_embed.addition_t_embedding.weight"].shape == (2, 64)
    x, t, ctx = inputs()
    cond = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(x, t, ctx, additional_t_cond=cond)
        default = model(x, t, ctx)
    assert_close(out, reference_forward(sd, x, t, ctx, t_cond=cond))
    assert_close(default, reference_forward(sd, x, t, ctx, t_cond=torch.zeros(2)))


def test_state_dict_names():
    model = QwenImageTransformer2DModel(**CFG)
    keys = set(model.state_dict())
    expected = {"img_in.weight", "img_in.bias", "txt_norm.weight", "txt_in.weight", "txt_in.bias",
                "time_text_embed.timestep_embedder.linear_1.weight", "time_text_embed.timestep_embedder.linear_1.bias",
                "time_text_embed.timestep_embedder.linear_2.weight", "time_text_embed.timestep_embedder.linear_2.bias",
                "norm_out.linear.weight", "norm_out.linear.bias", "proj_out.weight", "proj_out.bias"}
    linears = ["img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
               "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out",
               "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    norms = ["attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k"]
    for i in range(CFG["num_layers"]):
        expected |= {f"transformer_blocks.{i}.{n}.{p}" for n in linears for p in ("weight", "bias")}
        expected |= {f"transformer_blocks.{i}.{n}.weight" for n in norms}
    assert keys == expected
    sd = model.state_dict()
    assert sd["transformer_blocks.0.img_mod.1.weight"].shape == (6 * 64, 64)
    assert sd["transformer_blocks.0.img_mlp.net.0.proj.weight"].shape == (256, 64)
    assert sd["transformer_blocks.0.attn.norm_q.weight"].shape == (32,)
    assert sd["proj_out.weight"].shape == (64, 64)
    assert sd["txt_norm.weight"].shape == (48,)
    # real defaults
    assert QwenImageTransformer2DModel.__init__.__defaults__[:5] == (2, 64, 16, 60, 128)
    no_final = QwenImageTransformer2DModel(**CFG, final_layer=False)
    assert not any(k.startswith(("norm_out", "proj_out")) for k in no_final.state_dict())


class CountingOps(comfy.ops.disable_weight_init):
    """Linear shaped like the mixed-precision one: a plain Module (not nn.Linear), same constructor."""
    created = []
    called = set()

    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
            CountingOps.created.append(self)

        def forward(self, x):
            CountingOps.called.add(id(self))
            return torch.nn.functional.linear(x, self.weight, self.bias)


def test_custom_operations_used_for_every_linear(monkeypatch):
    CountingOps.created.clear()
    CountingOps.called.clear()
    model, sd = build(operations=CountingOps, default_ref_method="index_timestep_zero", use_additional_t_cond=True)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, CountingOps.Linear)]
    assert len(linears) == len(CountingOps.created) == 6 + 14 * CFG["num_layers"]
    assert all(isinstance(m, CountingOps.Embedding) for m in model.modules() if isinstance(m, torch.nn.Embedding))

    groups = []
    real_group = comfy.ops.run_linear_group

    def spy(inp, modules):
        groups.append(tuple(modules))
        out = real_group(inp, modules)
        assert isinstance(out, tuple) and len(out) == 3
        return out

    monkeypatch.setattr(comfy.ops, "run_linear_group", spy)
    x, t, ctx = inputs()
    refs = [torch.randn(2, 16, 1, 6, 8)]
    with torch.no_grad():
        out = model(x, t, ctx, ref_latents=refs)
    assert CountingOps.called == {id(m) for m in linears}
    assert len(groups) == 2 * CFG["num_layers"]
    a = model.transformer_blocks[0].attn
    assert groups[0] == (a.to_q, a.to_k, a.to_v) and groups[1] == (a.add_q_proj, a.add_k_proj, a.add_v_proj)

    ref_model, _ = build(default_ref_method="index_timestep_zero", use_additional_t_cond=True)
    ref_model.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(out, ref_model(x, t, ctx, ref_latents=refs), atol=1e-6, rtol=1e-6)


def test_compute_dtype_casts_inputs():
    model = QwenImageTransformer2DModel(**CFG, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in random_state_dict(model).items()})
    x, t, ctx = inputs()
    with torch.no_grad():
        out = model(x, t, ctx, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()

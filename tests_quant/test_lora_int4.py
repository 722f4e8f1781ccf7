"""LoRA on int4 layers: every target kind, every file naming, stacking, strength, clones, unpatch.

What is compared: for each patched layer, ``y_patched − y_unpatched`` of THAT layer (the module called
directly on a random input; q/k/v also through ``comfy.ops.run_linear_group``) against the exact delta
computed in float64 from the LoRA file's tensors only: ``s·(x Aᵀ)Bᵀ`` with ``s = strength·alpha/rank``
(LoRA), ``x ΔWᵀ`` with ΔW from the LyCORIS formulas written out here (LoHa, LoKr).

Tolerance (``lora_helpers.delta_tolerance``, derivation in its module docstring): a patch never touches
an int4 layer's main path (codes, scales, smoothing, bias), so both outputs share it and differ only by
the added term and roundings:

    |(y_p − y_u) − Δ| ≤ u·(|y_p| + |y_u|)          output rounding of each output, u = compute-dtype roundoff
                       + 4u·Σ|Δ terms|             Aᵀ and s·B (or ΔW) rounded to the compute dtype (2u), an
                                                   intermediate x·Aᵀ and the term's own output rounding (2u)
                       + (k+4)·2⁻²⁴·Σ|all terms|   fp32 accumulation (k = K main products + ≤ K ranks)
                       [+ u·Σ|all terms|]          float targets: W + ΔW is stored back in the compute dtype
                       [+ e·‖x_row‖₂·‖ΔW‖_F]       a dense delta applied as an SVD truncation of measured
                                                   relative Frobenius error e (Cauchy–Schwarz)

with Σ|terms| from ``reference.svdquant_forward`` / ``awq_forward`` magnitudes (base) and
``s·(|x||A|ᵀ)|B|ᵀ`` (delta). In fp32 that is ~1e-4 of the delta's size, and every check also asserts it is
tight enough that a delta off by 10 % fails on most elements; in bf16 the 4u·Σ|Δ terms| part (the bf16
rounding of the appended factors) dominates, so bf16 checks are asserted to see a 50 % error.
"""
from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch

import comfy.lora
import comfy.model_patcher
import comfy.nodes
import comfy.ops
import comfy.sd
import comfy.utils
import comfy_kitchen
import lora_helpers as H
from lora_helpers import assert_same_state, model_state, no_grad, weight_key  # noqa: F401 (no_grad: a fixture)
from comfy.quant import formats
from comfy.quant.deltas import output_terms
from factories import prefixed, svdquant_tensors
from reference import kernel_tolerance

SVD_SIGNED = "transformer_blocks.0.attn.to_out.0"
SVD_SIGNED_MLP = "transformer_blocks.1.img_mlp.net.0.proj"
SVD_UNSIGNED = "transformer_blocks.0.img_mlp.net.2"
AWQ = "transformer_blocks.1.img_mod.1"
FLOAT_IMG = "img_in"
FLOAT_TXT = "txt_in"
QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
DTYPES = [torch.float32, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("no_grad")


class Probes:
    """Inputs, unpatched outputs and base magnitudes of some layers of one loaded model."""

    def __init__(self, mp, paths, dtype, seed=0, shape=(2, 5)):
        self.mp, self.dtype = mp, dtype
        self.x, self.base, self.mag = {}, {}, {}
        for i, p in enumerate(paths):
            mod = self.mod(p)
            x = H.rand_input((*shape, mod.in_features), dtype, seed + 17 * i, gelu=p.endswith("net.2"))
            self.x[p], self.base[p] = x, mod(x)
            self.mag[p] = H.base_magnitude(mod, x, dtype)

    def mod(self, p):
        return self.mp.model.diffusion_model.get_submodule(p)

    def run(self):
        return {p: self.mod(p)(x) for p, x in self.x.items()}

    def check(self, outs, expected, what="", svd_terms=None):
        """``expected``: {path: [(delta, Σ|delta terms|), ...]} (summed: stacked LoRAs)."""
        for p, contribs in expected.items():
            delta = sum(d for d, _ in contribs)
            mag_d = sum(m for _, m in contribs)
            mod = self.mod(p)
            tol = H.delta_tolerance(outs[p], self.base[p], self.mag[p], mag_d, self.dtype, 2 * mod.in_features,
                                    merged_weight=formats.format_of(mod.weight) is None,
                                    svd_term=(svd_terms or {}).get(p))
            H.assert_delta(outs[p].double() - self.base[p].double(), delta, tol,
                           discriminate=0.1 if self.dtype == torch.float32 else 0.5,
                           min_frac=0.5 if self.dtype == torch.float32 else 0.25, what=f"{what} {p}")

    def check_unchanged_within_rounding(self, outs, paths):
        """Output equal to the unpatched one up to fp32 re-association of the (zero-padded) low rank sum."""
        for p in paths:
            mod = self.mod(p)
            tol = (2 * mod.in_features + 4) * 2.0 ** -24 * self.mag[p] + 1e-30
            err = (outs[p].double() - self.base[p].double()).abs()
            assert bool((err <= tol).all()), f"{p}: changed by {float(err.max()):.3e}"

    def check_exactly_unchanged(self, outs, paths):
        for p in paths:
            assert torch.equal(outs[p], self.base[p]), p


def lora_on(paths, style="diffusers", r=4, alpha=None, seed=0, dtype=torch.float32, mp=None):
    """A LoRA file with one pair per path (shapes from the model) and {path: (up, down, alpha/r)}."""
    sd, fac = {}, {}
    for i, p in enumerate(paths):
        mod = mp.model.diffusion_model.get_submodule(p)
        up, down = H.factors(mod.out_features, mod.in_features, r, seed + 31 * i)
        up, down = up.to(dtype), down.to(dtype)
        sd.update(H.lora_sd(style, p, up, down, alpha))
        fac[p] = (up, down, 1.0 if alpha is None else alpha / r)
    return sd, fac


def expect_lowrank(probes, fac, strength):
    return {p: [H.lowrank_delta(probes.x[p], up, down, strength * a)] for p, (up, down, a) in fac.items()}




def has_output_deltas(model):
    return [n for n, m in model.named_modules() if output_terms(getattr(m, "weight", None))]


def loha_factors(n, k, r, seed, amp=0.25):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, r, generator=g) * amp, torch.randn(r, k, generator=g) * amp,
            torch.randn(n, r, generator=g) * amp, torch.randn(r, k, generator=g) * amp)


def loha_dw(w1a, w1b, w2a, w2b, alpha):
    """LyCORIS LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank, rank = w1b rows (float64)."""
    d = lambda t: t.double()  # noqa: E731
    return (d(w1a) @ d(w1b)) * (d(w2a) @ d(w2b)) * (alpha / w1b.shape[0])


def lokr_dw(w1, w2):
    """LyCORIS LoKr with both factors full: ΔW = w1 ⊗ w2 (alpha unused), float64."""
    out = torch.zeros(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], dtype=torch.float64)
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            out[i * w2.shape[0]:(i + 1) * w2.shape[0], j * w2.shape[1]:(j + 1) * w2.shape[1]] = \
                float(w1[i, j]) * w2.double()
    return out


# ---------------------------------------------------------------------------------- every target kind
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", [SVD_SIGNED, SVD_SIGNED_MLP, SVD_UNSIGNED, AWQ, FLOAT_IMG, FLOAT_TXT])
def test_lowrank_delta_on_each_target_kind(dtype, path):
    mp = H.load_model(dtype)
    probes = Probes(mp, [path], dtype, seed=1)
    mod = probes.mod(path)
    fmt = formats.format_of(mod.weight)
    rank0 = mod.weight._params.proj_up.shape[1] if fmt is not None and fmt.name == "svdquant_w4a4" else None
    lora, fac = lora_on([path], style="kohya", r=4, alpha=2.0, seed=3, mp=mp)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 0.8, 0)
    assert mp.patches == {} and list(patched.patches) == [weight_key(path)]
    patched.patch_model()
    if rank0 is not None:  # exact: appended to the branch that reads raw x, no extra output term
        assert mod.weight._params.proj_up.shape[1] == rank0 + 4 and not has_output_deltas(mp.model)
    elif fmt is not None:
        assert [type(t).__name__ for t in output_terms(mod.weight)] == ["LowRankOutput"]
    else:
        assert formats.format_of(mod.weight) is None and mod.weight.dtype == dtype
    probes.check(probes.run(), expect_lowrank(probes, fac, 0.8), what="kohya s=0.8·2/4")
    patched.unpatch_model()
    probes.check_exactly_unchanged(probes.run(), [path])


# ----------------------------------------------------------------------------------------- q/k/v
def _count_quantize(monkeypatch):
    calls = []
    orig = comfy_kitchen.quantize_svdquant_w4a4

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(comfy_kitchen, "quantize_svdquant_w4a4", counting)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_qkv_lora_keeps_shared_quantization(dtype, monkeypatch):
    mp = H.load_model(dtype)
    dm = mp.model.diffusion_model
    mods = [dm.get_submodule(p) for p in QKV]
    shared0 = mods[0].weight._params.proj_down
    assert all(m.weight._params.proj_down is shared0 for m in mods)
    x = H.rand_input((2, 5, mods[0].in_features), dtype, 5)
    probes = Probes(mp, [], dtype)
    for p, m in zip(QKV, mods):  # q/k/v read the same input
        probes.x[p], probes.base[p], probes.mag[p] = x, m(x), H.base_magnitude(m, x, dtype)

    lora, fac = {}, {}
    for i, (p, r) in enumerate(zip(QKV, (4, 3, 2))):  # different ranks per projection
        up, down = H.factors(mods[i].out_features, mods[i].in_features, r, 40 + i)
        lora.update(H.lora_sd("diffusers", p, up, down))
        fac[p] = (up, down, 1.0)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    patched.patch_model()

    shared = mods[0].weight._params.proj_down
    assert shared.shape[1] == shared0.shape[1] + 9
    assert all(m.weight._params.proj_down is shared for m in mods), "q/k/v no longer share proj_down"
    assert all(m.weight._params.smooth_factor is mods[0].weight._params.smooth_factor for m in mods)
    separate = {p: m(x) for p, m in zip(QKV, mods)}
    probes.check(separate, expect_lowrank(probes, fac, 1.0), what="q/k/v separate")

    calls = _count_quantize(monkeypatch)
    grouped = comfy.ops.run_linear_group(x, mods)
    assert len(calls) == 1, "one activation quantization for the three projections"
    probes.check(dict(zip(QKV, grouped)), expect_lowrank(probes, fac, 1.0), what="q/k/v grouped")
    for p, g in zip(QKV, grouped):
        assert torch.equal(g, separate[p]), p

    patched.unpatch_model()
    assert all(m.weight._params.proj_down is shared0 for m in mods), "sharing not restored"
    calls.clear()
    grouped = comfy.ops.run_linear_group(x, mods)
    assert len(calls) == 1
    for p, g in zip(QKV, grouped):
        assert torch.equal(g, probes.base[p]), p


def test_lora_only_on_to_k_leaves_q_and_v(monkeypatch):
    mp = H.load_model(torch.float32)
    dm = mp.model.diffusion_model
    mods = [dm.get_submodule(p) for p in QKV]
    x = H.rand_input((3, 4, mods[0].in_features), torch.float32, 6)
    probes = Probes(mp, [], torch.float32)
    for p, m in zip(QKV, mods):
        probes.x[p], probes.base[p], probes.mag[p] = x, m(x), H.base_magnitude(m, x, torch.float32)
    rank0 = mods[0].weight._params.proj_up.shape[1]
    up, down = H.factors(mods[1].out_features, mods[1].in_features, 5, 50)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, H.lora_sd("diffusers", QKV[1], up, down), 1.0, 0)
    patched.patch_model()
    for m in (mods[0], mods[2]):  # compact: no columns for to_k's LoRA, they read the shared base rank only
        assert m.weight._params.proj_up is m.weight.int4_base._params.proj_up
        assert m.weight._params.proj_down.shape[1] == rank0 + 5
    outs = {p: m(x) for p, m in zip(QKV, mods)}
    probes.check_unchanged_within_rounding(outs, [QKV[0], QKV[2]])
    probes.check({QKV[1]: outs[QKV[1]]}, {QKV[1]: [H.lowrank_delta(x, up, down, 1.0)]}, what="to_k only")
    calls = _count_quantize(monkeypatch)
    grouped = comfy.ops.run_linear_group(x, mods)
    assert len(calls) == 1
    for p, g in zip(QKV, grouped):
        assert torch.equal(g, outs[p]), p


# ------------------------------------------------------------------------------------ file formats
@pytest.mark.parametrize("style,alpha", [("diffusers", None), ("lycoris", None), ("kohya", 8.0), ("comfy", 1.0)])
def test_lora_file_namings_map_and_apply(style, alpha, caplog):
    mp = H.load_model(torch.float32)
    paths = [SVD_SIGNED, QKV[2], AWQ, FLOAT_TXT]
    probes = Probes(mp, paths, torch.float32, seed=7)
    lora, fac = lora_on(paths, style=style, r=4, alpha=alpha, seed=60, mp=mp)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert "not loaded" not in caplog.text.lower(), caplog.text
    assert sorted(patched.patches) == sorted(weight_key(p) for p in paths)
    patched.patch_model()
    probes.check(probes.run(), expect_lowrank(probes, fac, 1.0), what=style)
    patched.unpatch_model()


def _svd_truncation_error(mod, rank0, dw):
    """Relative Frobenius error of the factors appended to an SVDQuant layer w.r.t. ``dw`` (float64)."""
    p = mod.weight._params
    got = p.proj_up[:, rank0:].double() @ p.proj_down[:, rank0:].double().t()
    return float((got - dw).norm() / dw.norm()), p.proj_up.shape[1] - rank0


def test_loha_and_lokr_exact_dense_or_svd(caplog):
    mp = H.load_model(torch.float32)
    dm = mp.model.diffusion_model
    paths = [SVD_SIGNED, SVD_SIGNED_MLP, AWQ, FLOAT_TXT]
    probes = Probes(mp, paths, torch.float32, seed=8)
    lora, dws = {}, {}
    # LoHa rank 2 ⊙ rank 2 → rank ≤ 4 on an SVDQuant layer: SVD path (extra rank)
    f = loha_factors(256, 256, 2, 70)
    lora.update(H.loha_sd(SVD_SIGNED, *f, alpha=3.0))
    dws[SVD_SIGNED] = loha_dw(*f, 3.0)
    # full-rank LoKr (rank 16·16 = 256 > 128) on an SVDQuant layer (1024, 256): exact dense term
    g = torch.Generator().manual_seed(71)
    w1, w2 = torch.randn(32, 16, generator=g) * 0.3, torch.randn(32, 16, generator=g) * 0.05
    lora.update(H.lokr_sd(SVD_SIGNED_MLP, w1, w2))
    dws[SVD_SIGNED_MLP] = lokr_dw(w1, w2)
    # LoHa on AWQ (1536, 256): dense output term
    f = loha_factors(1536, 256, 3, 72)
    lora.update(H.loha_sd(AWQ, *f, alpha=1.5))
    dws[AWQ] = loha_dw(*f, 1.5)
    # LoKr on a float layer (256, 128): merged
    w1, w2 = torch.randn(8, 4, generator=g) * 0.3, torch.randn(32, 32, generator=g) * 0.05
    lora.update(H.lokr_sd(FLOAT_TXT, w1, w2))
    dws[FLOAT_TXT] = lokr_dw(w1, w2)

    rank0 = {p: dm.get_submodule(p).weight._params.proj_up.shape[1] for p in (SVD_SIGNED, SVD_SIGNED_MLP)}
    strength = 0.9
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, strength, 0)
    assert sorted(patched.patches) == sorted(weight_key(p) for p in paths)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        patched.patch_model()
    svd_logs = [r.getMessage() for r in caplog.records if SVD_SIGNED in r.getMessage()]
    assert any("SVD" in m and "rank-4" in m and "error" in m for m in svd_logs), svd_logs
    dense_logs = [r.getMessage() for r in caplog.records if SVD_SIGNED_MLP in r.getMessage()]
    assert any("dense" in m and "256" in m for m in dense_logs), dense_logs

    # SVD path: the appended factors reproduce strength·ΔW within the 1e-3 promise; use the measured error
    err, extra = _svd_truncation_error(dm.get_submodule(SVD_SIGNED), rank0[SVD_SIGNED], strength * dws[SVD_SIGNED])
    assert extra == 4 and err <= 1e-3, (extra, err)
    assert not has_output_deltas(dm.get_submodule(SVD_SIGNED))
    # dense fallback: rank unchanged, one exact dense output term
    mlp = dm.get_submodule(SVD_SIGNED_MLP)
    assert mlp.weight._params.proj_up.shape[1] == rank0[SVD_SIGNED_MLP]
    assert [type(t).__name__ for t in output_terms(mlp.weight)] == ["DenseOutput"]
    assert [type(t).__name__ for t in output_terms(dm.get_submodule(AWQ).weight)] == ["DenseOutput"]

    expected = {p: [H.dense_delta(probes.x[p], strength * dw)] for p, dw in dws.items()}
    svd_term = H.svd_truncation_term(probes.x[SVD_SIGNED], strength * dws[SVD_SIGNED], rel_tol=err + 1e-6)
    probes.check(probes.run(), expected, what="LoHa/LoKr", svd_terms={SVD_SIGNED: svd_term})
    patched.unpatch_model()
    assert not has_output_deltas(mp.model)


# ----------------------------------------------------------------------------- stacking and strength
def test_stacked_loras_sum():
    mp = H.load_model(torch.float32)
    paths = [SVD_SIGNED, SVD_UNSIGNED, QKV[0], QKV[1], AWQ, FLOAT_IMG]
    probes = Probes(mp, paths, torch.float32, seed=9)
    lora1, fac1 = lora_on([SVD_SIGNED, SVD_UNSIGNED, QKV[0], AWQ, FLOAT_IMG], "diffusers", r=4, seed=80, mp=mp)
    lora2, fac2 = lora_on([SVD_SIGNED, SVD_UNSIGNED, QKV[1], AWQ, FLOAT_IMG], "kohya", r=3, alpha=6.0, seed=90,
                          mp=mp)
    g = torch.Generator().manual_seed(91)  # plus a dense (LoKr) term on the AWQ layer in the second file
    w1, w2 = torch.randn(6, 4, generator=g) * 0.3, torch.randn(256, 64, generator=g) * 0.02
    lora2.update(H.lokr_sd(AWQ, w1, w2))
    lora2.pop("lora_unet_" + AWQ.replace(".", "_") + ".lora_up.weight")  # AWQ: only the LoKr in file 2
    lora2.pop("lora_unet_" + AWQ.replace(".", "_") + ".lora_down.weight")
    lora2.pop("lora_unet_" + AWQ.replace(".", "_") + ".alpha")
    del fac2[AWQ]
    m1, _ = comfy.sd.load_lora_for_models(mp, None, lora1, 1.0, 0)
    m2, _ = comfy.sd.load_lora_for_models(m1, None, lora2, 0.7, 0)
    assert len(m2.patches[weight_key(SVD_SIGNED)]) == 2 and len(m1.patches[weight_key(SVD_SIGNED)]) == 1
    m2.patch_model()
    assert [type(t).__name__ for t in output_terms(probes.mod(AWQ).weight)] == ["LowRankOutput", "DenseOutput"]
    expected = {p: [] for p in paths}
    for p, c in expect_lowrank(probes, fac1, 1.0).items():
        expected[p] += c
    for p, c in expect_lowrank(probes, fac2, 0.7).items():
        expected[p] += c
    expected[AWQ].append(H.dense_delta(probes.x[AWQ], 0.7 * lokr_dw(w1, w2)))
    probes.check(probes.run(), expected, what="stacked")
    m2.unpatch_model()
    probes.check_exactly_unchanged(probes.run(), paths)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_strength_change_from_one_loaded_lora(dtype):
    mp = H.load_model(dtype)
    paths = [SVD_SIGNED, QKV[2], AWQ, FLOAT_TXT]
    probes = Probes(mp, paths, dtype, seed=10)
    lora, fac = lora_on(paths, "comfy", r=4, alpha=2.0, seed=100, mp=mp)
    half, _ = comfy.sd.load_lora_for_models(mp, None, lora, 0.5, 0)
    full, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    full.patch_model()
    out_full = probes.run()
    half.patch_model()  # switches clones: unpatches `full` first
    out_half = probes.run()
    probes.check(out_full, expect_lowrank(probes, fac, 1.0), what="strength 1.0")
    probes.check(out_half, expect_lowrank(probes, fac, 0.5), what="strength 0.5")
    if dtype == torch.float32:  # and directly: the delta halves
        for p in paths:
            d_full = out_full[p].double() - probes.base[p].double()
            d_half = out_half[p].double() - probes.base[p].double()
            assert float((d_half - 0.5 * d_full).abs().max()) <= 1e-4 * float(d_full.abs().max()), p
    half.unpatch_model()
    probes.check_exactly_unchanged(probes.run(), paths)


# -------------------------------------------------------------------------------- clone alternation
def test_clone_alternation_is_bit_exact():
    mp = H.load_model(torch.float32)
    paths = [SVD_SIGNED, SVD_UNSIGNED, QKV[0], QKV[2], AWQ, FLOAT_IMG]
    probes = Probes(mp, paths, torch.float32, seed=11)
    lora_a, fac_a = lora_on([SVD_SIGNED, QKV[0], AWQ, FLOAT_IMG], "diffusers", r=4, seed=110, mp=mp)
    lora_b, fac_b = lora_on([SVD_SIGNED, SVD_UNSIGNED, QKV[2], AWQ, FLOAT_IMG], "kohya", r=2, alpha=1.0,
                            seed=120, mp=mp)
    a, _ = comfy.sd.load_lora_for_models(mp, None, lora_a, 1.0, 0)
    b, _ = comfy.sd.load_lora_for_models(mp, None, lora_b, 1.0, 0)
    exp_a = {p: expect_lowrank(probes, fac_a, 1.0).get(p, []) for p in paths}
    exp_b = {p: expect_lowrank(probes, fac_b, 1.0).get(p, []) for p in paths}

    def check(outs, exp, what):
        changed = {p: c for p, c in exp.items() if c}
        probes.check(outs, changed, what=what)
        # untouched layers: q/k/v siblings of a patched projection carry zero columns (fp32 rounding);
        # layers of no LoRA are bit-exact
        probes.check_unchanged_within_rounding(outs, [p for p, c in exp.items() if not c])

    a.patch_model()
    out_a = probes.run()
    check(out_a, exp_a, "A")
    b.patch_model()
    out_b = probes.run()
    check(out_b, exp_b, "B")
    a.patch_model()
    for p, y in probes.run().items():
        assert torch.equal(y, out_a[p]), f"A again: {p}"
    b.patch_model()
    for p, y in probes.run().items():
        assert torch.equal(y, out_b[p]), f"B again: {p}"
    mp.patch_model()  # the base patcher takes the model back: B is unpatched
    probes.check_exactly_unchanged(probes.run(), paths)
    assert not has_output_deltas(mp.model)
    a.patch_model()
    for p, y in probes.run().items():
        assert torch.equal(y, out_a[p]), f"A third time: {p}"
    a.unpatch_model()
    probes.check_exactly_unchanged(probes.run(), paths)


# -------------------------------------------------------------------------------------------- unpatch
def test_unpatch_restores_every_tensor_bit_exact():
    mp = H.load_model(torch.float32)
    dm = mp.model.diffusion_model
    before = model_state(mp)
    shared = dm.get_submodule(QKV[0]).weight._params.proj_down
    lora, _ = lora_on([SVD_SIGNED, SVD_UNSIGNED, QKV[0], QKV[1], AWQ, FLOAT_IMG, FLOAT_TXT], "diffusers", seed=130,
                      mp=mp)
    lora.update(H.loha_sd(SVD_SIGNED_MLP, *loha_factors(1024, 256, 2, 131)))  # SVD path
    g = torch.Generator().manual_seed(132)
    lora.update(H.lokr_sd("transformer_blocks.0.txt_mlp.net.0.proj", torch.randn(32, 16, generator=g),
                          torch.randn(32, 16, generator=g) * 0.05))  # dense fallback
    lora.update(H.loha_sd("transformer_blocks.0.txt_mod.1", *loha_factors(1536, 256, 2, 133)))  # AWQ dense
    lora[f"diffusion_model.{SVD_SIGNED}.diff_b"] = torch.randn(256, generator=g)  # float bias of an int4 layer
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert f"diffusion_model.{SVD_SIGNED}.bias" in patched.patches
    patched.patch_model()
    during = mp.model.state_dict()
    changed = [k for k in before if not (before[k].shape == during[k].shape and torch.equal(before[k], during[k]))]
    for k in (f"diffusion_model.{SVD_SIGNED}.weight_proj_up", f"diffusion_model.{SVD_SIGNED}.bias",
              f"diffusion_model.{FLOAT_IMG}.weight"):
        assert k in changed, k
    assert has_output_deltas(mp.model)
    patched.unpatch_model()
    assert_same_state(before, model_state(mp))
    assert has_output_deltas(mp.model) == []
    assert all(dm.get_submodule(p).weight._params.proj_down is shared for p in QKV)
    assert patched.backup == {} and getattr(mp.model, "current_patcher", None) is None


def test_add_patches_after_patch_model_reapplies():
    mp = H.load_model(torch.float32)
    paths = [SVD_SIGNED, AWQ, FLOAT_IMG]
    probes = Probes(mp, paths, torch.float32, seed=18)
    lora1, fac1 = lora_on(paths, "diffusers", r=4, seed=200, mp=mp)
    lora2, fac2 = lora_on(paths, "comfy", r=2, seed=210, mp=mp)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora1, 1.0, 0)
    patched.patch_model()
    key_map = comfy.lora.model_lora_keys_unet(mp.model)
    assert len(patched.add_patches(comfy.lora.load_lora(lora2, key_map), 0.5)) == 3
    patched.patch_model()  # same patcher, new patches: unpatched and re-applied, not stacked twice
    expected = {p: expect_lowrank(probes, fac1, 1.0)[p] + expect_lowrank(probes, fac2, 0.5)[p] for p in paths}
    probes.check(probes.run(), expected, what="re-applied")
    assert [type(t).__name__ for t in output_terms(probes.mod(AWQ).weight)] == ["LowRankOutput"]
    patched.unpatch_model()
    probes.check_exactly_unchanged(probes.run(), paths)


# after a move while patched, unpatch must re-tie q/k/v (the meta device stands in for a second device)
def test_unpatch_after_move_keeps_qkv_sharing():
    mp = H.load_model(torch.float32)
    dm = mp.model.diffusion_model
    mods = [dm.get_submodule(p) for p in QKV]
    rank0 = mods[0].weight._params.proj_down.shape[1]
    up, down = H.factors(256, 256, 4, 220)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, H.lora_sd("diffusers", QKV[0], up, down), 1.0, 0)
    patched.patch_model()
    patched.patch_model(device_to=torch.device("meta"))
    assert all(m.weight._params.proj_down is mods[0].weight._params.proj_down for m in mods)  # holds
    patched.unpatch_model()
    assert mods[0].weight.device.type == "meta" and mods[0].weight._params.proj_down.shape[1] == rank0
    assert not has_output_deltas(mp.model)
    assert all(m.weight._params.proj_down is mods[0].weight._params.proj_down for m in mods), \
        "q/k/v sharing lost by unpatch after a move"


# -------------------------------------------------------------------------------- refused / skipped
def test_wrong_shape_pair_skipped_reported_rest_applied(caplog):
    mp = H.load_model(torch.float32)
    paths = [QKV[0], QKV[2], AWQ, FLOAT_IMG, FLOAT_TXT, SVD_SIGNED]
    probes = Probes(mp, paths, torch.float32, seed=12)
    before = model_state(mp)
    good, fac = lora_on([QKV[0], FLOAT_IMG, SVD_SIGNED], "diffusers", seed=140, mp=mp)
    bad = {}
    up, down = H.factors(256, 256 + 64, 4, 141)  # K wrong for to_v
    bad.update(H.lora_sd("diffusers", QKV[2], up, down))
    up, down = H.factors(1536 + 8, 256, 4, 142)  # N wrong for the AWQ layer
    bad.update(H.lora_sd("diffusers", AWQ, up, down))
    up, down = H.factors(128, 256, 4, 143)  # txt_in (256, 128) transposed: same numel, wrong shape
    bad.update(H.lora_sd("diffusers", FLOAT_TXT, up, down))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(mp, None, {**good, **bad}, 1.0, 0)
    # int4 targets are checked and refused; the float txt_in patch is queued unchecked, as upstream queues it
    assert sorted(patched.patches) == sorted(weight_key(p) for p in (QKV[0], FLOAT_IMG, SVD_SIGNED, FLOAT_TXT))
    for p in (QKV[2], AWQ):
        msgs = [r.getMessage() for r in caplog.records if p in r.getMessage() and r.levelno >= logging.WARNING]
        assert any("not" in m.lower() for m in msgs), (p, caplog.text)
        assert any(r.levelno >= logging.ERROR and p in r.getMessage() for r in caplog.records), p
    patched.patch_model()
    outs = probes.run()
    probes.check(outs, expect_lowrank(probes, fac, 1.0), what="good part")
    probes.check_unchanged_within_rounding(outs, [QKV[2]])  # zero-padded sibling of to_q
    probes.check_exactly_unchanged(outs, [AWQ])
    assert not has_output_deltas(mp.model)
    patched.unpatch_model()
    assert_same_state(before, model_state(mp))


# a LoRA pair whose up/down ranks differ is refused when the file is loaded (a warning naming its keys and
# the ranks), the rest of the file applies
def test_rank_mismatched_pair_on_int4_is_skipped(caplog):
    mp = H.load_model(torch.float32)
    paths = [SVD_SIGNED, FLOAT_IMG]
    probes = Probes(mp, paths, torch.float32, seed=13)
    good, fac = lora_on([FLOAT_IMG], "diffusers", seed=150, mp=mp)
    up, _ = H.factors(256, 256, 5, 151)
    _, down = H.factors(256, 256, 4, 152)  # up (256, 5), down (4, 256): ranks differ
    lora = {**good, **H.lora_sd("diffusers", SVD_SIGNED, up, down)}
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    with caplog.at_level(logging.WARNING):
        patched.patch_model()
    assert any(SVD_SIGNED in r.getMessage() and "rank 5 != 4" in r.getMessage() and r.levelno >= logging.WARNING
               for r in caplog.records)
    assert list(patched.patches) == [weight_key(FLOAT_IMG)]
    outs = probes.run()
    probes.check_exactly_unchanged(outs, [SVD_SIGNED])
    probes.check(outs, expect_lowrank(probes, fac, 1.0), what="rest applied")


@pytest.mark.parametrize("dora_path", [SVD_SIGNED, AWQ])
def test_dora_on_int4_refused(dora_path, caplog):
    mp = H.load_model(torch.float32)
    paths = [dora_path, FLOAT_IMG]
    probes = Probes(mp, paths, torch.float32, seed=14)
    before = model_state(mp)
    lora, fac = lora_on(paths, "comfy", r=4, alpha=4.0, seed=160, mp=mp)
    lora[f"diffusion_model.{dora_path}.dora_scale"] = torch.rand(1, probes.mod(dora_path).in_features) + 0.5
    del fac[dora_path]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("DoRA" in m and dora_path in m for m in errors), caplog.text
    assert any("NOT LOADED" in r.getMessage() and dora_path in r.getMessage() for r in caplog.records), caplog.text
    assert list(patched.patches) == [weight_key(FLOAT_IMG)]
    patched.patch_model()
    outs = probes.run()
    probes.check_exactly_unchanged(outs, [dora_path])
    probes.check(outs, expect_lowrank(probes, fac, 1.0), what="float part")
    after = mp.model.state_dict()
    for k in before:
        if k.startswith(f"diffusion_model.{dora_path}."):
            assert torch.equal(before[k], after[k]), k
    patched.unpatch_model()


# ------------------------------------------------------------------------------------------- nodes
def test_lora_loader_model_only_full_path_and_no_reread(tmp_path, monkeypatch):
    mp = H.load_model(torch.float32)
    paths = [SVD_SIGNED, QKV[1], AWQ, FLOAT_IMG]
    probes = Probes(mp, paths, torch.float32, seed=15)
    lora, fac = lora_on(paths, "diffusers", r=4, seed=170, dtype=torch.bfloat16, mp=mp)  # a bf16 file
    path = tmp_path / "some dir" / "my_lora.safetensors"
    path.parent.mkdir()
    safetensors.torch.save_file(lora, str(path))
    reads = []
    orig = comfy.utils.load_torch_file
    monkeypatch.setattr(comfy.utils, "load_torch_file", lambda *a, **k: reads.append(a) or orig(*a, **k))

    node = comfy.nodes.LoraLoaderModelOnly()
    (full,) = node.load_lora_model_only(mp, str(path), 1.0)
    (half,) = node.load_lora_model_only(mp, str(path), 0.5)
    assert len(reads) == 1, "a strength change must not re-read the file"
    assert isinstance(full, comfy.model_patcher.ModelPatcher) and full is not mp and full.model is mp.model
    assert mp.patches == {}
    full.patch_model()
    probes.check(probes.run(), expect_lowrank(probes, fac, 1.0), what="node 1.0")
    half.patch_model()
    probes.check(probes.run(), expect_lowrank(probes, fac, 0.5), what="node 0.5")
    half.unpatch_model()
    probes.check_exactly_unchanged(probes.run(), paths)


# ------------------------------------------------------------------------------------------ offsets
class _FusedDM(torch.nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.to_qkv = comfy.ops.mixed_precision_ops({}, torch.float32).Linear(k, 3 * d)
        self.lora_fused_targets = {"attn.to_qkv": [("attn.to_q", 0, 0, d), ("attn.to_k", 0, d, d),
                                                   ("attn.to_v", 0, 2 * d, d)]}


class _FusedModel(torch.nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.diffusion_model = _FusedDM(d, k)


@pytest.mark.parametrize("part,kind", [("attn.to_k", "lora"), ("attn.to_v", "loha")])
def test_fused_offsets_change_only_their_rows(part, kind):
    d, k = 128, 256
    model = _FusedModel(d, k)
    res = model.diffusion_model.load_state_dict(prefixed("attn.to_qkv", svdquant_tensors(3 * d, k, 16, seed=3)),
                                                strict=False)
    assert not res.unexpected_keys and not res.missing_keys
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    lin = model.diffusion_model.attn.to_qkv
    x = H.rand_input((3, 7, k), torch.float32, 16)
    y0 = lin(x)
    t = {kk: v for kk, v in lin.state_dict().items()}
    mag0 = H.base_magnitude(lin, x, torch.float32)
    if kind == "lora":
        up, down = H.factors(d, k, 4, 180)
        lora = H.lora_sd("kohya", part, up, down, alpha=2.0)
        exp, mag_d = H.lowrank_delta(x, up, down, 0.5)
        svd_term = None
    else:
        f = loha_factors(d, k, 2, 181)
        lora = H.loha_sd(part, *f, alpha=2.0)
        dw = loha_dw(*f, 2.0)
        exp, mag_d = H.dense_delta(x, dw)
    start = {"attn.to_k": d, "attn.to_v": 2 * d}[part]
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert list(patched.patches) == ["diffusion_model.attn.to_qkv.weight"]
    assert patched.patches["diffusion_model.attn.to_qkv.weight"][0][3] == (0, start, d)
    rank0 = lin.weight._params.proj_up.shape[1]
    patched.patch_model()
    if kind == "loha":
        p = lin.weight._params
        got = p.proj_up[start:start + d, rank0:].double() @ p.proj_down[:, rank0:].double().t()
        err = float((got - dw).norm() / dw.norm())
        assert err <= 1e-3 and torch.count_nonzero(p.proj_up[:start, rank0:]) == 0
        svd_term = H.svd_truncation_term(x, dw, rel_tol=err + 1e-6)
    y1 = lin(x)
    rows = slice(start, start + d)
    others = torch.ones(3 * d, dtype=torch.bool)
    others[rows] = False
    tol = H.delta_tolerance(y1[..., rows], y0[..., rows], mag0[..., rows], mag_d, torch.float32, 2 * k,
                            svd_term=svd_term)
    H.assert_delta(y1[..., rows].double() - y0[..., rows].double(), exp, tol, what=f"fused {part}")
    err_other = (y1[..., others].double() - y0[..., others].double()).abs()
    assert bool((err_other <= (2 * k + 4) * 2.0 ** -24 * mag0[..., others]).all()), float(err_other.max())
    patched.unpatch_model()
    assert torch.equal(lin(x), y0)
    after = lin.state_dict()
    assert all(torch.equal(t[kk], after[kk]) for kk in t)


# -------------------------------------------------------------------------------------- device move
def _check_patch_then_move(dev):
    mp = H.load_model(torch.bfloat16)
    paths = [SVD_SIGNED, SVD_UNSIGNED, AWQ, FLOAT_IMG]
    probes = Probes(mp, paths, torch.bfloat16, seed=17)
    lora, fac = lora_on(paths + [QKV[0]], "diffusers", r=4, seed=190, mp=mp)
    exp = expect_lowrank(probes, {p: fac[p] for p in paths}, 1.0)
    ref = H.load_model(torch.bfloat16)
    ref.patch_model(device_to=dev)  # the same checkpoint, unpatched, on the device
    base_dev = {p: ref.model.diffusion_model.get_submodule(p)(probes.x[p].to(dev)).cpu() for p in paths}

    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    patched.patch_model()  # on the CPU
    cpu_out = probes.run()
    probes.check(cpu_out, exp, what="cpu")
    patched.patch_model(device_to=dev)  # moved while patched
    dm = mp.model.diffusion_model
    mods = [dm.get_submodule(p) for p in QKV]
    assert all(m.weight._params.proj_down is mods[0].weight._params.proj_down for m in mods)
    assert mods[0].weight._params.proj_down.device.type == dev.type
    xq = H.rand_input((2, 5, 256), torch.bfloat16, 19).to(dev)
    for g, m in zip(comfy.ops.run_linear_group(xq, mods), mods):
        assert torch.equal(g, m(xq))
    for p in paths:
        mod = probes.mod(p)
        y = mod(probes.x[p].to(dev)).cpu()
        # the device kernel rounds differently from the CPU one: generic kernel bound on both outputs
        k = 2 * mod.in_features
        tol = (kernel_tolerance(probes.mag[p], torch.bfloat16, k)
               + kernel_tolerance(probes.mag[p] + exp[p][0][1], torch.bfloat16, k))
        err = ((y.double() - base_dev[p].double()) - exp[p][0][0]).abs()
        assert bool((err <= tol).all()), (p, float((err / tol).max()))
    patched.unpatch_model()
    assert not has_output_deltas(mp.model)
    for p in paths:
        assert torch.equal(probes.mod(p)(probes.x[p].to(dev)).cpu(), base_dev[p]), p
    assert_same_state({k: v.cpu() for k, v in ref.model.state_dict().items()},
                       {k: v.cpu() for k, v in mp.model.state_dict().items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_patch_on_cpu_then_move_to_cuda():
    _check_patch_then_move(torch.device("cuda"))


def test_failure_while_patching_leaves_nothing_half_patched(monkeypatch):
    mp = H.load_model(torch.float32)
    before = model_state(mp)
    lora, _ = lora_on([FLOAT_IMG, SVD_SIGNED, AWQ], "diffusers", seed=300, mp=mp)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    awq = formats.get_format("awq_w4a16")

    def boom(members):
        raise RuntimeError("simulated failure inside a format")

    monkeypatch.setattr(awq, "apply_deltas", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        patched.patch_model()
    assert getattr(mp.model, "current_patcher", None) is None and not patched.backup
    assert not has_output_deltas(mp.model)
    assert_same_state(before, model_state(mp))


def test_lora_check_reports_each_mapping_how_it_applies_and_what_did_not_map():
    from comfy.quant_tools.lora_check import lora_check

    mp = H.load_model()
    r = 4
    sd = {}
    for path, seed in ((SVD_SIGNED, 1), (AWQ, 2), ("transformer_blocks.0.attn.to_q", 3)):
        n, k = mp.model.diffusion_model.get_submodule(path).weight.shape
        up, down = H.factors(n, k, r, seed)
        sd.update(H.lora_sd("diffusers", path, up, down))
    up, down = H.factors(8, 8, r, 4)
    sd.update(H.lora_sd("diffusers", "no_such_block.proj", up, down))  # maps nowhere
    rows, unmapped = lora_check(mp, sd)
    how = {target: text for _, target, text in rows}
    assert how[f"diffusion_model.{SVD_SIGNED}.weight"] == f"appended rank {r} to the low-rank branch"
    assert how[f"diffusion_model.{AWQ}.weight"] == f"additive rank-{r} output term"
    assert len(rows) == 3
    assert unmapped == sorted(k for k in sd if "no_such_block" in k)

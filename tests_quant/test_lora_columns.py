"""LoRA at no cost on q/k/v share groups: one shared ``proj_down``, each member's compact ``proj_up``.

A share group's LoRA downs are stacked once, ``proj_down = [base | member LoRA columns ...]`` (a down that
several members' adapters hold, e.g. one ``lora_A`` of a fused-qkv LoRA, appears once), and each member
keeps ``proj_up = [base_up | its own s·B]`` of shape (N, R0 + its rank), with ``lora_cols = (R0, C1)``
saying where its own columns sit in ``x @ proj_down``.

What is compared, and to what:

* the GEMM (int8 and FP8 kernels, under Triton's interpreter on the CPU) against the float64 reference
  of the member's OWN function, ``w4a4_gemm_reference`` with ``proj_down = [base | Aᵢᵀ]`` and
  ``proj_up = [base_up | Bᵢ]`` built here from the factors (no column map involved), within
  ``w4a4_kernel_tolerance`` (derivation in ``reference.py``; the low-rank input's fp32 sums and bf16
  rounding are weighed there whatever the width of the shared input). Negative controls: a sibling's
  C1 (reading its LoRA columns), and a compact ``proj_up`` without its map (refused, not misread);
* whole layers through the model patcher: kitchen's path (fp32 model) as ``y_patched − y_unpatched``
  against ``s·(x Aᵀ)Bᵀ`` from the LoRA file's tensors, within ``lora_helpers.delta_tolerance`` (its
  derivation: the main path cancels, the factors' rounding and fp32 sums remain), and the project's
  kernels (bf16 model) against the member's own function as above, with a sibling's function as the
  negative control;
* the stored tensors themselves: compact shapes, the LoRA columns bit-equal to the factors rounded once
  to the compute dtype, a saved state dict loadable to the same function, and unpatching bit-exact.
"""
from __future__ import annotations

import pytest
import torch

import comfy.sd
import lora_helpers as H
from comfy.ops import mixed_precision_ops, run_linear_group
from comfy.quant import kernels, patching
from comfy.quant.formats import format_of
from comfy.quant.formats.svdquant_w4a4 import kitchen_view, lora_columns
from comfy.weight_adapter.lora import LoRAAdapter
from factories import prefixed
from fp8_emulation import K, fp8_case, natural
from kernel_env import DEVICE, W4A4, assert_same_arithmetic, requires_kernels
from lora_helpers import no_grad, weight_key  # noqa: F401 (no_grad: a fixture)
from reference import w4a4_gemm_reference, w4a4_kernel_tolerance

pytestmark = pytest.mark.usefixtures("no_grad")
QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
E4M3 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------- the GEMM alone
def _member_function(t, downs, ups):
    """Stored tensors of the plain layer computing base + these factors (``downs`` (r, K), ``ups`` (N, r))."""
    dt = t["weight_proj_down"].dtype
    return dict(t, weight_proj_down=torch.cat([t["weight_proj_down"], *[d.t().to(dt) for d in downs]], 1),
                weight_proj_up=torch.cat([t["weight_proj_up"], *[u.to(dt) for u in ups]], 1))


def _kernel_bound(codes, ascales, t, x, dtype):
    ref, mag_main, mag_low, mag_la = w4a4_gemm_reference(codes, ascales, t, x, t["bias"])
    return ref, w4a4_kernel_tolerance(ref, mag_main, mag_low, mag_la, dtype, K, t["weight_proj_down"].shape[1])


@requires_kernels
@pytest.mark.parametrize("codes", [torch.int8, E4M3], ids=["int8", "fp8"])
@pytest.mark.parametrize("r0", [32, 24], ids=["aligned", "straddling"])  # 24: R blocks straddle the base rank
def test_gemm_reads_only_each_members_columns(codes, r0):
    m, dtype = 7, torch.bfloat16
    t, x = fp8_case(m, dtype, seed=30 + r0, rank=r0)
    g = torch.Generator().manual_seed(r0)
    ranks = (16, 8, 24)
    downs = [(torch.randn(r, K, generator=g) * 0.05).to(DEVICE) for r in ranks]
    ups = [(torch.randn(t["weight"].shape[0], r, generator=g) * 0.05).to(DEVICE) for r in ranks]
    shared = torch.cat([t["weight_proj_down"], *[d.t().to(dtype) for d in downs]], 1)
    starts = [r0 + sum(ranks[:i]) for i in range(3)]
    q, s = W4A4.quantize(x, t["weight_smooth_factor"], False, codes=codes)
    la = W4A4.lora_activation(x, shared)
    nat, ascales = natural(q)[:m], s[:, :m].t()
    for i in range(3):
        own = _member_function(t, [downs[i]], [ups[i]])
        compact = own["weight_proj_up"]
        assert compact.shape == (t["weight"].shape[0], r0 + ranks[i])  # no column of a sibling's rank

        def run(cols):
            return W4A4.gemm(q, s, m, t["weight"], t["weight_scale"], la, compact, t["bias"], dtype, lora_cols=cols)

        y = run((r0, starts[i]))
        ref, tol = _kernel_bound(nat, ascales, own, x, dtype)
        err = (y.double() - ref).abs()
        assert torch.isfinite(y).all() and (err <= tol).all(), f"member {i}: max err/tol {(err / tol).max():.3g}"
        # negative control: a sibling's start reads its LoRA columns against this member's up
        wrong = run((r0, starts[(i + 1) % 3]))
        assert ((wrong.double() - ref).abs() > tol).any()
    with pytest.raises(ValueError, match="do not lie inside"):  # a compact proj_up that lost its map
        W4A4.gemm(q, s, m, t["weight"], t["weight_scale"], la, compact, t["bias"], dtype)
    with pytest.raises(ValueError, match="do not lie inside"):  # columns past the shared input
        W4A4.gemm(q, s, m, t["weight"], t["weight_scale"], la, compact, t["bias"], dtype,
                  lora_cols=(r0, la.shape[1] - ranks[2] + 1))


# ---------------------------------------------------------------------------------- through the patcher
def _mods(mp):
    return [H.module_of(mp, p) for p in QKV]


def _base_probe(mods, x, dtype):
    """Unpatched outputs and Σ|terms| of each member for input ``x``."""
    return [m(x) for m in mods], [H.base_magnitude(m, x, dtype) for m in mods]


def _patched(mp, lora, strength=1.0, device=None):
    patched = comfy.sd.load_lora_for_models(mp, None, lora, strength, 0)[0]
    patched.patch_model(device_to=device)
    return patched


def _file_lora(mp, paths, r, seed, alpha=None, dtype=torch.float32):
    """A diffusers LoRA on ``paths`` and ``{path: [(up, down, alpha scale)]}`` (factors in ``dtype``)."""
    sd, fac = {}, {}
    for i, p in enumerate(paths):
        mod = H.module_of(mp, p)
        up, down = (f.to(dtype) for f in H.factors(mod.out_features, mod.in_features, r, seed + 31 * i))
        sd.update(H.lora_sd("diffusers", p, up, down, alpha))
        fac[p] = [(up, down, 1.0 if alpha is None else alpha / r)]
    return sd, fac


def _check_kitchen(mods, x, base, mag, expected, strength, what):
    """Each member's change (separate and grouped calls) against the float64 delta of its own factors."""
    outs = {"separate": [m(x) for m in mods], "grouped": list(run_linear_group(x, mods))}
    for how, ys in outs.items():
        for p, m, y, y0, mg in zip(QKV, mods, ys, base, mag):
            contribs = [H.lowrank_delta(x, up, down, strength * a) for up, down, a in expected.get(p, [])]
            delta = sum((d for d, _ in contribs), torch.zeros_like(y0, dtype=torch.float64))
            mag_d = sum((md for _, md in contribs), torch.zeros_like(y0, dtype=torch.float64))
            tol = H.delta_tolerance(y, y0, mg, mag_d, torch.float32, 2 * m.in_features)
            H.assert_delta(y.double() - y0.double(), delta, tol, discriminate=0.1 if contribs else 0,
                           what=f"{what} {how} {p}")
    for a, b in zip(outs["separate"], outs["grouped"]):
        assert torch.equal(a, b)
    return outs["separate"]


def _check_layout(mods, expected, strength, gaps=0):
    """One shared proj_down; each member's compact proj_up holds its base columns and its own LoRA columns
    only (``gaps``: columns of siblings' downs lying inside its span, zero, allowed only where shared downs
    overlap), its own columns bit-equal to the factors rounded once, and its mapped columns multiplying
    out to its own ΔW (float64)."""
    shared = mods[0].weight._params.proj_down
    extra = 0
    for p, m in zip(QKV, mods):
        w, base = m.weight, m.weight.int4_base
        assert w._params.proj_down is shared and w._params.smooth_factor is mods[0].weight._params.smooth_factor
        r0, dt, dev = base._params.proj_down.shape[1], base._params.proj_up.dtype, base._params.proj_up.device
        own = [(up.to(dev), down.to(dev), a) for up, down, a in expected.get(p, [])]
        width = sum(up.shape[1] for up, _, _ in own)
        got = w._params.proj_up.shape[1] - r0
        assert w._params.proj_up.shape[0] == m.out_features and width <= got <= width + gaps, (p, got, width)
        extra += got - width
        assert torch.equal(w._params.proj_up[:, :r0], base._params.proj_up)
        cols = lora_columns(w)
        c1 = r0 if cols is None else cols[1]
        assert cols is None or cols[0] == r0
        if cols is None:  # the plain layout: its columns are the whole tail of proj_down
            assert shared.shape[1] == r0 + got
        mapped = w._params.proj_up[:, r0:].double() @ shared[:, c1:c1 + got].double().t()
        want = sum(((up.float() * (strength * a)).to(dt).double() @ down.float().to(dt).double()
                    for up, down, a in own), torch.zeros_like(mapped))
        assert torch.allclose(mapped, want, rtol=1e-12, atol=1e-12), p
        for up, down, a in own:  # each factor's columns, bit for bit, somewhere in its span
            r = up.shape[1]
            assert any(torch.equal(w._params.proj_up[:, r0 + j:r0 + j + r], (up.float() * (strength * a)).to(dt))
                       and torch.equal(shared[:, c1 + j:c1 + j + r], down.float().t().to(dt))
                       for j in range(got - r + 1)), p
    assert extra == gaps


def _own_tensors(m, own, strength):
    """The member's function as one plain layer's stored tensors, from its base and its own factors."""
    base = format_of(m.weight).state_dict(m.weight.int4_base)
    base, dev = {**base, "bias": m.bias}, m.bias.device
    return _member_function(base, [down.to(dev).float() for _, down, _ in own],
                            [up.to(dev).float() * (strength * a) for up, _, a in own])


def _check_triton(mods, x, expected, strength, what):
    """bf16 model, the project's kernels: each grouped output within the kernel bound of its own function,
    equal to its separate call, and NOT within the bound of a sibling's function."""
    x2 = x.reshape(-1, x.shape[-1])
    with kernels.forced("triton"):
        grouped = run_linear_group(x, mods)
        separate = [m(x) for m in mods]
    smooth = mods[0].weight._params.smooth_factor
    q, s = W4A4.quantize(x2, smooth, False)
    nat, ascales = natural(q)[:x2.shape[0]], s[:, :x2.shape[0]].t()
    refs = []
    for p, m, y, y1 in zip(QKV, mods, grouped, separate):
        own = _own_tensors(m, expected.get(p, []), strength)
        ref, tol = _kernel_bound(nat, ascales, own, x2, torch.bfloat16)
        err = (y.reshape(ref.shape).double() - ref).abs()
        assert (err <= tol).all(), f"{what} {p}: max err/tol {(err / tol).max():.3g}"
        assert_same_arithmetic(y, y1, tol.reshape(y.shape))
        refs.append((ref, tol))
    for i, (p, m) in enumerate(zip(QKV, mods)):  # negative control: a sibling's LoRA on this member
        other = QKV[(i + 1) % 3]
        if expected.get(other):
            wrong = _kernel_bound(nat, ascales, _own_tensors(m, expected[other], strength), x2, torch.bfloat16)[0]
            ref, tol = refs[i]
            assert ((wrong - ref).abs() > tol).any(), f"{what} {p}: cannot tell its LoRA from {other}'s"


def _scenario(dtype, build, strength=1.0, device=None):
    """Load the tiny model (moved to ``device``), probe q/k/v, patch with ``build(mp) -> (patcher or LoRA
    dict, expected)``."""
    mp = H.load_model(dtype)
    if device is not None:
        mp.patch_model(device_to=device)
    mods = _mods(mp)
    x = H.rand_input((2, 5, mods[0].in_features), dtype, 3).to(mods[0].weight.device)
    base, mag = _base_probe(mods, x, dtype)
    before = H.model_state(mp)
    made, expected = build(mp)
    patched = _patched(mp, made, strength, device) if isinstance(made, dict) else made
    if not isinstance(made, dict):
        patched.patch_model(device_to=device)
    return mp, mods, x, base, mag, before, patched, expected


def _q_only(mp):
    return _file_lora(mp, QKV[:1], 5, 50)


def _qkv(mp):
    sd, fac = {}, {}
    for i, (p, r) in enumerate(zip(QKV, (4, 3, 2))):  # a rank per projection
        s, f = _file_lora(mp, [p], r, 40 + i)
        sd.update(s)
        fac.update(f)
    return sd, fac


def _stacked(mp):
    """Two LoRA files: rank 4 on q/k/v (alpha 2), rank 3 on q and v; one clone of the other."""
    sd1, fac1 = _file_lora(mp, QKV, 4, 60, alpha=2.0)
    sd2, fac2 = _file_lora(mp, (QKV[0], QKV[2]), 3, 70)
    m1 = comfy.sd.load_lora_for_models(mp, None, sd1, 1.0, 0)[0]
    m2 = comfy.sd.load_lora_for_models(m1, None, sd2, 1.0, 0)[0]
    return m2, {p: fac1.get(p, []) + fac2.get(p, []) for p in QKV}


def _fused(mp, members=QKV, r=6, seed=80, shared_down=None):
    """One LoRA whose ``lora_A`` all of ``members`` hold (a fused-qkv LoRA split over the projections), each
    with its own rows of ``lora_B``: adapters sharing one down tensor."""
    mods = {p: H.module_of(mp, p) for p in members}
    k = next(iter(mods.values())).in_features
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(r, k, generator=g) * k ** -0.5 if shared_down is None else shared_down
    patches, fac = {}, {}
    for p, m in mods.items():
        up = torch.randn(m.out_features, r, generator=g) * 0.3
        patches[weight_key(p)] = LoRAAdapter(set(), (up, down, None, None, None, None))
        fac[p] = [(up, down, 1.0)]
    clone = mp.clone()
    assert len(clone.add_patches(patches, 1.0)) == len(members)
    return clone, fac


def _overlapping(mp):
    """Three shared downs X (q, k), Y (k, v), Z (q, v): no order of them keeps every member's columns
    contiguous, so one member's span holds a sibling's down, which its compact up must zero."""
    fac = {p: [] for p in QKV}
    n, k = H.module_of(mp, QKV[0]).weight.shape
    g = torch.Generator().manual_seed(90)
    clone = mp.clone()
    for pair in ((0, 1), (1, 2), (0, 2)):
        down = torch.randn(3, k, generator=g) * k ** -0.5
        for i in pair:
            up = torch.randn(n, 3, generator=g) * 0.3
            clone.add_patches({weight_key(QKV[i]): LoRAAdapter(set(), (up, down, None, None, None, None))}, 1.0)
            fac[QKV[i]].append((up, down, 1.0))
    return clone, fac


SCENARIOS = {"q_only": _q_only, "qkv": _qkv, "stacked": _stacked, "fused_shared_down": _fused,
             "overlapping_shared_downs": _overlapping}
GAPS = {"overlapping_shared_downs": 3}  # one member's span holds a sibling's rank-3 down


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kitchen_path_each_member_gets_its_own_lora_and_unpatch_is_bit_exact(name):
    mp, mods, x, base, mag, before, patched, expected = _scenario(torch.float32, SCENARIOS[name])
    _check_layout(mods, expected, 1.0, GAPS.get(name, 0))
    _check_kitchen(mods, x, base, mag, expected, 1.0, name)
    patched.unpatch_model()
    H.assert_same_state(before, H.model_state(mp))
    for m, y0 in zip(mods, base):
        assert torch.equal(m(x), y0)
    assert all(lora_columns(m.weight) is None for m in mods)


@requires_kernels
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_project_kernels_run_each_members_own_function(name):
    mp, mods, x, base, mag, before, patched, expected = _scenario(torch.bfloat16, SCENARIOS[name], device=DEVICE)
    _check_layout(mods, expected, 1.0, GAPS.get(name, 0))
    _check_triton(mods, x, expected, 1.0, name)
    patched.unpatch_model()
    H.assert_same_state(before, H.model_state(mp))


def test_column_counts_q_only_and_shared_down():
    """q-only: q is a plain layer (its columns are proj_down's tail), k and v keep their base proj_up object
    and read the base columns only. A shared lora_A is appended ONCE and every member maps onto it."""
    mp, mods, *_ = _scenario(torch.float32, _q_only)
    r0 = mods[0].weight.int4_base._params.proj_down.shape[1]
    assert mods[0].weight._params.proj_down.shape[1] == r0 + 5 and lora_columns(mods[0].weight) is None
    for m in mods[1:]:
        assert m.weight._params.proj_up is m.weight.int4_base._params.proj_up
        assert lora_columns(m.weight) == (r0, r0)
    mp, mods, *_ = _scenario(torch.float32, _fused)
    assert mods[0].weight._params.proj_down.shape[1] == r0 + 6  # not r0 + 3·6
    assert [lora_columns(m.weight) for m in mods] == [None, None, None]  # each: base + the one shared block
    mp, mods, *_ = _scenario(torch.float32, _qkv)
    assert mods[0].weight._params.proj_down.shape[1] == r0 + 9
    assert [m.weight._params.proj_up.shape[1] for m in mods] == [r0 + 4, r0 + 3, r0 + 2]
    assert [lora_columns(m.weight)[1] for m in mods] == [r0, r0 + 4, r0 + 7]


def test_strength_change_and_clone_alternation():
    mp = H.load_model(torch.float32)
    mods = _mods(mp)
    x = H.rand_input((2, 5, mods[0].in_features), torch.float32, 4)
    base, mag = _base_probe(mods, x, torch.float32)
    before = H.model_state(mp)
    sd, fac = _qkv(mp)
    full = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)[0]
    half = comfy.sd.load_lora_for_models(mp, None, sd, 0.5, 0)[0]
    full.patch_model()
    out_full = _check_kitchen(mods, x, base, mag, fac, 1.0, "1.0")
    half.patch_model()  # unpatches `full` first
    _check_layout(mods, fac, 0.5)
    _check_kitchen(mods, x, base, mag, fac, 0.5, "0.5")
    full.patch_model()
    for m, y in zip(mods, out_full):
        assert torch.equal(m(x), y)
    full.unpatch_model()
    H.assert_same_state(before, H.model_state(mp))


def test_saved_state_dict_of_a_mapped_member_loads_to_the_same_function():
    """A file has no column map: the member's widened proj_up (zeros at its siblings' columns) is written,
    and a layer loaded from it computes exactly what the patched member computes on kitchen's path."""
    mp, mods, x, *_ = _scenario(torch.float32, _qkv)
    k = mods[1]
    assert lora_columns(k.weight) is not None
    sd = k.state_dict()
    assert sd["weight_proj_up"].shape == (k.out_features, sd["weight_proj_down"].shape[1])
    r0, c1 = lora_columns(k.weight)
    wide = sd["weight_proj_up"]
    own = k.weight._params.proj_up
    assert torch.equal(wide[:, :r0], own[:, :r0]) and torch.equal(wide[:, c1:c1 + own.shape[1] - r0], own[:, r0:])
    assert torch.count_nonzero(wide[:, r0:c1]) == 0 and torch.count_nonzero(wide[:, c1 + own.shape[1] - r0:]) == 0
    fresh = mixed_precision_ops({}, compute_dtype=torch.float32).Linear(k.in_features, k.out_features)
    fresh._load_from_state_dict(prefixed("l", sd), "l.", {}, True, [], [], [])
    assert lora_columns(fresh.weight) is None
    assert torch.equal(fresh(x), k(x))
    assert kitchen_view(fresh.weight) is fresh.weight


# ---------------------------------------------------------------------------------- patching internals
def test_adapters_sharing_a_down_tensor_share_its_key_and_its_device_copy():
    g = torch.Generator().manual_seed(5)
    down, other = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    a = LoRAAdapter(set(), (torch.randn(16, 4, generator=g), down, None, None, None, None))
    b = LoRAAdapter(set(), (torch.randn(16, 4, generator=g), down, None, None, None, None))
    c = LoRAAdapter(set(), (torch.randn(16, 4, generator=g), other, None, None, None, None))
    weight = torch.empty(16, 32)
    keys = [patching.deltas_of([(1.0, ad, 1.0, None, None)], weight)[0].down_key for ad in (a, b, c)]
    assert keys[0] == keys[1] != keys[2]
    # a column offset embeds the down in zeros: not the same full down
    assert patching._down_key(a, (1, 0, 32)) != keys[0]
    moved = {}
    meta = torch.device("meta")
    ma, mb = patching._on_device(a, meta, moved), patching._on_device(b, meta, moved)
    assert ma.weights[1] is mb.weights[1] and ma.weights[0] is not mb.weights[0] and len(moved) == 3


def test_value_scan_runs_once_per_tensor_until_it_is_written(monkeypatch):
    scans = []
    real = patching._scan_amax
    monkeypatch.setattr(patching, "_scan_amax", lambda t: scans.append(1) or real(t))
    up, down = H.factors(16, 32, 4, 7)
    adapter = LoRAAdapter(set(), (up, down, None, None, None, None))
    assert patching.adapter_problem(adapter) is None and len(scans) == 2
    assert patching.adapter_problem(adapter, strength_patch=0.5) is None and len(scans) == 2  # a strength change
    down[1, 2] = float("nan")  # written in place: scanned again, and refused
    assert "NaN" in patching.adapter_problem(adapter) and len(scans) == 3
    with torch.inference_mode():
        frozen = torch.randn(8, 8)
    assert patching._amax(frozen) == patching._amax(frozen) and len(scans) == 4

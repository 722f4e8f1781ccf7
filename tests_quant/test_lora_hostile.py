"""Hostile LoRA input: every patch is checked before anything is patched, one bad module is refused and
reported, the rest applies exactly as a LoRA of the valid modules only would, and unpatching is bit-exact.

What is compared: the hostile LoRA's result against the same model patched with a LoRA of only its valid
modules. Both queue the same patches (the refused module is not queued at all), so the arithmetic is
identical and the comparison is bit-exact, no tolerance: every tensor of the patched model (state dict and
the output terms int4 layers carry) per hostile kind and target, and the whole model's output once with
five bad modules at a time. Where a delta is checked against its float64 expectation (strength ±100) the
tolerance is ``lora_helpers.delta_tolerance`` (derivation in its module docstring).
"""
from __future__ import annotations

import functools
import gc
import logging
import math
import os
import time
import tracemalloc
import warnings

import pytest
import torch

import comfy.lora
import comfy.sd
import lora_helpers as H
from lora_helpers import no_grad, weight_key  # noqa: F401 (no_grad: a fixture)
from comfy import weight_adapter
from comfy.quant import host
from comfy.quant.deltas import output_terms
from comfy.quant_tools.lora_check import has_problems, lora_check

QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
SVD = QKV[1]  # an SVDQuant W4A4 layer in a q/k/v share group
SVD_MLP = "transformer_blocks.0.img_mlp.net.0.proj"
AWQ = "transformer_blocks.0.img_mod.1"  # an AWQ W4A16 modulation layer
FLOAT = "img_in"
FLOAT_TXT = "txt_in"
LAYERS = [QKV[0], SVD, SVD_MLP, AWQ, FLOAT, FLOAT_TXT]
TARGETS = [SVD, AWQ]  # int4 targets: a float target's patches are queued unchecked, as upstream queues them


pytestmark = pytest.mark.usefixtures("no_grad")


def _inputs(mp, paths, seed=0):
    return {p: H.rand_input((2, 5, H.module_of(mp, p).in_features), torch.float32, seed + 7 * i)
            for i, p in enumerate(paths)}


def _outputs(mp, xs):
    return {p: H.module_of(mp, p)(x) for p, x in xs.items()}


def _patched_outputs(mp, lora, xs, strength=1.0):
    """(patcher, outputs with ``lora`` applied); the model is unpatched again afterwards."""
    patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, strength, 0)
    patcher.patch_model()
    outs = _outputs(mp, xs)
    patcher.unpatch_model()
    return patcher, outs


def _no_output_terms(mp):
    return not [n for n, m in mp.model.named_modules() if output_terms(getattr(m, "weight", None))]


def _refusals(caplog, path, phrase):
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and path in r.getMessage() and phrase in r.getMessage()]


# --------------------------------------------------------------------- one bad module, the rest applies
def _valid_paths(target):
    return [p for p in LAYERS if p != target]


def _patched_state(mp, lora):
    """(patcher, every tensor of the model while ``lora`` is applied: its state dict and the output terms
    int4 layers carry); the model is unpatched again afterwards. Equal patched states give equal outputs."""
    patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    patcher.patch_model()
    state = H.model_state(mp)
    for name, m in mp.model.named_modules():
        for i, term in enumerate(output_terms(getattr(m, "weight", None))):
            state.update({f"{name}.<term {i}>.{k}": v.clone() for k, v in term.named_buffers()})
    patcher.unpatch_model()
    return patcher, state


@functools.lru_cache(maxsize=None)
def _reference(target):
    """The patched state with a LoRA of the valid modules only (every test of ``target`` compares to it)."""
    mp = H.load_model(torch.float32)
    return _patched_state(mp, H.lora_for(mp, _valid_paths(target), seed=10)[0])[1]


@pytest.mark.parametrize("target", TARGETS, ids=["svdquant", "awq"])
@pytest.mark.parametrize("kind", sorted(H.HOSTILE))
def test_bad_module_refused_rest_applies_exactly(kind, target, caplog):
    mp = H.load_model(torch.float32)
    before = H.model_state(mp)
    valid = _valid_paths(target)
    good, _ = H.lora_for(mp, valid, seed=10)
    n, k = H.module_of(mp, target).weight.shape
    bad = H.hostile_module(kind, target, n, k, seed=20)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        hostile, state = _patched_state(mp, {**good, **bad})
    assert _refusals(caplog, target, H.HOSTILE[kind]), caplog.text  # (a) reported, naming the module and why
    assert sorted(hostile.patches) == sorted(weight_key(p) for p in valid)  # refused before anything was queued
    H.assert_same_state(before, H.model_state(mp))  # (c) bit-exact after unpatch
    assert _no_output_terms(mp) and not hostile.backup
    H.assert_same_state(_reference(target), state)  # (b) exactly what a LoRA of the valid modules gives
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_reference_lora_changes_each_valid_layer():
    """The references above are not trivially equal: each valid module's tensors differ from the model's."""
    mp = H.load_model(torch.float32)
    before = H.model_state(mp)
    ref = _reference(SVD)
    for p in _valid_paths(SVD):
        changed = [k for k in before if k.startswith(f"diffusion_model.{p}.") and not torch.equal(before[k], ref[k])]
        terms = [k for k in ref if k.startswith(f"diffusion_model.{p}.<term")]
        assert changed or terms, p


# the fault each kind names is refused by add_patches too when a host builds adapters itself (upstream's
# load_lora checks nothing)
@pytest.mark.parametrize("target", TARGETS, ids=["svdquant", "awq"])
@pytest.mark.parametrize("kind", sorted(H.HOSTILE))
def test_add_patches_refuses_what_load_lora_would(kind, target, caplog):
    mp = H.load_model(torch.float32)
    n, k = H.module_of(mp, target).weight.shape
    bad = H.hostile_module(kind, target, n, k, seed=21)
    key_map = comfy.lora.model_lora_keys_unet(mp.model)
    prefix = next(p for p, t in key_map.items() if t == weight_key(target) and any(x.startswith(p + ".") for x in bad))
    patcher = mp.clone()
    with caplog.at_level(logging.WARNING):
        assert patcher.add_patches({weight_key(target): _unchecked_patch(bad, prefix)}) == []
    assert _refusals(caplog, weight_key(target), H.HOSTILE[kind]), caplog.text
    assert patcher.patches == {}


def _unchecked_patch(lora, prefix):
    """The adapter a host without load-time checks would build for ``prefix`` (as upstream's load_lora does)."""
    if f"{prefix}.diff" in lora:
        return ("diff", (lora[f"{prefix}.diff"],))
    alpha = lora.get(f"{prefix}.alpha")
    alpha = None if alpha is None else (alpha if alpha.numel() != 1 else alpha.item())
    for cls in weight_adapter.adapters:
        adapter = cls.load(prefix, lora, alpha, lora.get(f"{prefix}.dora_scale"), set())
        if adapter is not None:
            return adapter
    return None


# ------------------------------------------------------------------- the whole model, five bad modules
def test_model_output_equals_the_valid_modules_only(caplog):
    mp = H.load_model(torch.float32)
    before = H.model_state(mp)
    valid = [QKV[0], QKV[2], SVD_MLP, "transformer_blocks.1.img_mod.1", FLOAT_TXT]
    good, _ = H.lora_for(mp, valid, seed=30)
    bad = {}
    for kind, path in (("nan_factor", QKV[1]), ("loha_inconsistent", "transformer_blocks.0.txt_mlp.net.0.proj"),
                       ("lokr_inconsistent", AWQ), ("nan_diff", "transformer_blocks.1.attn.to_out.0"),
                       ("alpha_shape", "transformer_blocks.0.attn.to_out.0")):
        n, k = H.module_of(mp, path).weight.shape
        bad.update(H.hostile_module(kind, path, n, k, seed=31))
    g = torch.Generator().manual_seed(32)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    t, ctx = torch.rand(1, generator=g), torch.randn(1, 3, H.TXT_DIM, generator=g)
    dm = mp.model.diffusion_model

    hostile, _ = comfy.sd.load_lora_for_models(mp, None, {**good, **bad}, 0.9, 0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        hostile.patch_model()  # every patch was checked up front: nothing is discovered here
    assert not caplog.records, caplog.text
    y = dm(x, t, ctx)
    hostile.unpatch_model()
    H.assert_same_state(before, H.model_state(mp))
    ref, _ = comfy.sd.load_lora_for_models(mp, None, good, 0.9, 0)
    ref.patch_model()
    y_ref = dm(x, t, ctx)
    ref.unpatch_model()
    assert bool(torch.isfinite(y).all()) and torch.equal(y, y_ref)
    assert not torch.equal(y_ref, dm(x, t, ctx))


# -------------------------------------------------------------------------------------- strengths
@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, 1e30, 101.0, -101.0])
def test_bad_strength_refuses_every_int4_patch(strength, caplog):
    """Upstream's loader raises for no strength; the strength limit applies where an int4 weight is involved:
    each int4 patch is refused (reported, NOT LOADED), nothing is patched into an int4 layer."""
    mp = H.load_model(torch.float32)
    before = H.model_state(mp)
    lora, _ = H.lora_for(mp, [SVD, AWQ], seed=40)
    with caplog.at_level(logging.WARNING):
        patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, strength, 0)
    assert patcher.patches == {}
    for p in (SVD, AWQ):
        assert f"NOT LOADED {weight_key(p)}" in caplog.messages and "strength" in caplog.text, caplog.text
    assert mp.patches == {} and mp.backup == {}
    H.assert_same_state(before, H.model_state(mp))


@pytest.mark.parametrize("strength", [math.nan, math.inf, 1e30, -101.0])
@pytest.mark.parametrize("which", ["strength_patch", "strength_model"])
def test_add_patches_refuses_a_bad_strength_on_int4_only(strength, which, caplog):
    mp = H.load_model(torch.float32)
    lora, _ = H.lora_for(mp, [SVD, FLOAT], seed=41)
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(mp.model))
    patcher = mp.clone()
    with caplog.at_level(logging.ERROR):
        assert patcher.add_patches(loaded, **{which: strength}) == [weight_key(FLOAT)]  # float: as upstream
    assert sorted(patcher.patches) == [weight_key(FLOAT)]
    assert "not a finite number" in caplog.text or "outside [-100, 100]" in caplog.text, caplog.text


@pytest.mark.parametrize("strength", [100.0, -100.0])
def test_strength_at_the_limit_applies(strength):
    mp = H.load_model(torch.float32)
    paths = [SVD, AWQ, FLOAT]
    xs = _inputs(mp, paths, seed=2)
    base = _outputs(mp, xs)
    lora, fac = H.lora_for(mp, paths, seed=42, alpha=1.0)
    patcher, outs = _patched_outputs(mp, lora, xs, strength)
    assert sorted(patcher.patches) == sorted(weight_key(p) for p in paths)
    for p in paths:
        up, down, a = fac[p]
        delta, mag = H.lowrank_delta(xs[p], up, down, strength * a)
        mod = H.module_of(mp, p)
        tol = H.delta_tolerance(outs[p], base[p], H.base_magnitude(mod, xs[p], torch.float32), mag, torch.float32,
                                2 * mod.in_features, merged_weight=p == FLOAT)
        H.assert_delta(outs[p].double() - base[p].double(), delta, tol, what=f"strength {strength} {p}")


# ------------------------------------------------------------------------------ nothing that applies
def test_empty_lora_warns_and_applies_nothing(caplog):
    mp = H.load_model(torch.float32)
    with caplog.at_level(logging.WARNING):
        patcher, _ = comfy.sd.load_lora_for_models(mp, None, {}, 1.0, 0)
    assert patcher.patches == {} and "nothing applies" in caplog.text and "no keys" in caplog.text


def test_lora_for_another_model_warns_with_the_key_count(caplog):
    mp = H.load_model(torch.float32)
    up, down = H.factors(8, 8, 2, 43)
    lora = {**H.lora_sd("diffusers", "no_such.block", up, down), **H.lora_sd("kohya", "other.proj", up, down)}
    with caplog.at_level(logging.WARNING):
        patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert patcher.patches == {}
    assert any("nothing applies" in m and "of its 4 keys, 4 did not load" in m for m in caplog.messages), caplog.text


def test_lora_whose_every_patch_is_refused_warns(caplog):
    mp = H.load_model(torch.float32)
    n, k = H.module_of(mp, SVD).weight.shape
    with caplog.at_level(logging.WARNING):
        patcher, _ = comfy.sd.load_lora_for_models(mp, None, H.hostile_module("nan_factor", SVD, n, k), 1.0, 0)
    assert patcher.patches == {}
    assert any("nothing applies" in m and "1 patches were refused" in m for m in caplog.messages), caplog.text
    assert any(m == f"NOT LOADED {weight_key(SVD)}" for m in caplog.messages)


# ------------------------------------------------------------------------- one module, two spellings
@pytest.mark.parametrize("path", [QKV[0], AWQ, FLOAT])
def test_two_spellings_of_one_module_first_in_the_file_applies(path, caplog):
    mp = H.load_model(torch.float32)
    xs = _inputs(mp, [path], seed=3)
    n, k = H.module_of(mp, path).weight.shape
    first = H.lora_sd("diffusers", path, *H.factors(n, k, 4, 44))
    second = H.lora_sd("comfy", path, *H.factors(n, k, 2, 45), alpha=1.0)
    key_map = comfy.lora.model_lora_keys_unet(mp.model)
    for a, b in ((first, second), (second, first)):
        not_loaded, refused = [], []
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = comfy.lora.load_lora({**a, **b}, key_map, not_loaded=not_loaded, refused=refused)
        assert list(loaded) == [weight_key(path)] and sorted(not_loaded) == sorted(b)
        assert [r.reason.startswith("duplicate") for r in refused] == [True]
        for key in b:
            assert any(key in m and "duplicate" in m and weight_key(path) in m for m in caplog.messages), (key, caplog.text)
        _, outs = _patched_outputs(mp, {**a, **b}, xs)
        _, only_a = _patched_outputs(mp, a, xs)
        assert torch.equal(outs[path], only_a[path])


# ---------------------------------------------------------------------- load_lora never raises
def test_load_lora_reports_malformed_entries_instead_of_raising(caplog):
    mp = H.load_model(torch.float32)
    key_map = comfy.lora.model_lora_keys_unet(mp.model)
    up, down = H.factors(256, 256, 4, 46)
    lora = {**H.lora_sd("diffusers", QKV[0], up, down),  # fine
            **H.lora_sd("diffusers", QKV[1], up, down), "transformer." + QKV[1] + ".alpha": torch.ones(2),
            **H.lora_sd("diffusers", QKV[2], torch.tensor(1.0), down),  # a 0-d lora_B
            **H.lora_sd("kohya", SVD_MLP, up[:, :0], down[:0]),  # rank 0
            **H.lora_sd("comfy", AWQ, up, down), f"diffusion_model.{AWQ}.alpha": "four"}
    not_loaded, refused = [], []
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(lora, key_map, not_loaded=not_loaded, refused=refused)
    assert list(loaded) == [weight_key(QKV[0])]
    assert sorted(r.target for r in refused) == sorted(weight_key(p) for p in (QKV[1], QKV[2], SVD_MLP, AWQ))
    assert sorted(not_loaded) == sorted(k for k in lora if QKV[0] not in k)
    for phrase in ("alpha has shape (2,)", "lora_up/B has shape ()", "expected no zero-size dim", "'four' is not"):
        assert phrase in caplog.text, phrase


# --------------------------------------------------------------------------------------- lora-check
def test_lora_check_rows_say_rejected_with_the_reason():
    mp = H.load_model(torch.float32)
    good, _ = H.lora_for(mp, [QKV[0], FLOAT], seed=47)
    rows, unmapped = lora_check(mp, good)
    assert not has_problems(rows, unmapped) and len(rows) == 2
    n, k = H.module_of(mp, SVD).weight.shape
    lora = {**good, **H.hostile_module("nan_factor", SVD, n, k), **H.hostile_module("alpha_shape", AWQ, 1536, 256),
            **H.lora_sd("comfy", FLOAT, *H.factors(256, 64, 2, 48))}  # a second spelling of img_in
    rows, unmapped = lora_check(mp, lora)
    how = {target: text for _, target, text in rows if text.startswith("REJECTED")}
    assert set(how) == {weight_key(SVD), weight_key(AWQ), weight_key(FLOAT)} and unmapped == []
    assert all(text.startswith("REJECTED: ") for text in how.values())
    assert "1 NaN" in how[weight_key(SVD)] and "alpha has shape (2,)" in how[weight_key(AWQ)] and "duplicate" in how[weight_key(FLOAT)]
    assert has_problems(rows, unmapped)


# ------------------------------------------------------------------------------- the check itself
def test_adapter_shapes_agree_with_the_adapters_own_delta():
    """The shape arithmetic of ``adapter_problem`` is what the adapters compute: for every form it accepts
    the dense delta (on the meta device: shapes only) has the shape it predicts."""
    from comfy.quant.patching import _delta_shape
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter

    r = lambda *s: torch.randn(*s, device="meta")  # noqa: E731
    forms = [LoRAAdapter(set(), (r(8, 2), r(2, 6), 1.0, None, None, None)),
             LoRAAdapter(set(), (r(8, 2, 1, 1), r(2, 6, 1, 1), 1.0, r(2, 2, 3, 3), None, None)),
             LoHaAdapter(set(), (r(8, 2), r(2, 6), 2.0, r(8, 3), r(3, 6), None, None, None)),
             LoHaAdapter(set(), (r(2, 8), r(2, 6), 1.0, r(3, 8), r(3, 6), r(2, 2, 3, 3), r(3, 3, 3, 3), None)),
             LoKrAdapter(set(), (r(2, 3), r(4, 2), None, None, None, None, None, None, None)),
             LoKrAdapter(set(), (None, r(4, 2), 1.0, r(2, 1), r(1, 3), None, None, None, None)),
             LoKrAdapter(set(), (r(2, 3), None, 1.0, None, None, r(4, 2), r(2, 5), None, None)),
             LoKrAdapter(set(), (r(2, 3), None, 1.0, None, None, r(2, 4), r(2, 5), r(2, 2, 3, 3), None))]
    for adapter in forms:
        assert host.adapter_problem(adapter) is None, adapter
        got = adapter._delta(device="meta")
        assert (got.shape[0], got[0].numel()) == _delta_shape(adapter), adapter


# ------------------------------------------------------------------------------------------- soak
def _rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_count() -> int:
    with warnings.catch_warnings():  # isinstance on some lazily deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _new_tensor_bytes(mp, paths, originals) -> int:
    """Bytes of the tensors one patch_model creates on ``paths`` (new side tensors and output terms)."""
    seen, total = set(), 0
    for p in paths:
        w = H.module_of(mp, p).weight
        old = {id(v) for v in vars(originals[p]._params).values()}
        parts = [v for v in vars(w._params).values() if isinstance(v, torch.Tensor) and id(v) not in old]
        parts += [v for term in output_terms(w) for _, v in term.named_buffers()]
        for v in parts:
            if id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


def test_soak_patch_unpatch_stays_bit_exact_and_flat(record_property):
    """``COMFY_INT4_SOAK`` cycles (default 1000) of patch_model/unpatch_model with a LoRA on q/k/v, an MLP
    and a modulation layer: bit-exact every cycle, and memory flat after a 200-cycle warm-up.

    Bounds, each far below what a leak of one cycle's allocations would add:
    * RSS: one cycle creates ``per_cycle`` bytes of tensors (measured, ~0.2 MB); keeping even 5 % of them
      a cycle would grow RSS by 0.05 · cycles · per_cycle (~11 MB over 1000), so RSS may grow less;
    * gc-tracked objects: a leaked container a cycle adds ≥ ``cycles``; growth must stay < cycles / 4;
    * tensors alive: none may survive a cycle (growth ≤ 2);
    * Python heap (tracemalloc, traced from the warm-up on): < 256 KiB. CPython's type-attribute cache
      keeps up to 4096 attribute-name strings alive (~57 B each, ≤ ~230 KB: the names ``get_submodule``
      splits off each cycle), which tracemalloc counts as growth while the cache refills with strings of
      the measured cycles; measured 2–35 KB. A leak of 256 B a cycle (a tensor wrapper, a log record)
      exceeds the bound; smaller leaked containers are caught by the gc count, tensors by the tensor count.
    """
    cycles = int(os.environ.get("COMFY_INT4_SOAK", "1000"))
    mp = H.load_model(torch.float32)
    paths = [*QKV, SVD_MLP, AWQ]
    xs = _inputs(mp, paths, seed=4)
    before = H.model_state(mp)
    originals = {p: H.module_of(mp, p).weight for p in paths}
    base = _outputs(mp, xs)
    lora, _ = H.lora_for(mp, paths, seed=50, alpha=2.0)
    patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, 0.8, 0)
    patcher.patch_model()
    patched = _outputs(mp, xs)
    per_cycle = _new_tensor_bytes(mp, paths, originals)
    patcher.unpatch_model()

    def cycle(i):
        patcher.patch_model()
        if i % 100 == 0:
            assert all(torch.equal(y, patched[p]) for p, y in _outputs(mp, xs).items()), i
        patcher.unpatch_model()
        assert all(H.module_of(mp, p).weight is originals[p] for p in paths) and not patcher.backup, i
        if i % 100 == 0:
            assert all(torch.equal(y, base[p]) for p, y in _outputs(mp, xs).items()), i

    tracemalloc.start()
    try:
        for i in range(200):  # warm-up: allocator pools, interpreter caches
            cycle(i)
        gc.collect()
        rss0, objs0, tensors0 = _rss_bytes(), len(gc.get_objects()), _tensor_count()
        heap0 = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        for i in range(cycles):
            cycle(i)
        seconds = time.perf_counter() - start
        gc.collect()
        heap1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    rss1, objs1, tensors1 = _rss_bytes(), len(gc.get_objects()), _tensor_count()

    figures = {"cycles": cycles, "seconds_traced": round(seconds, 2), "per_cycle_bytes": per_cycle,
               "rss_mb": (round(rss0 / 2**20, 1), round(rss1 / 2**20, 1)), "heap_growth_bytes": heap1 - heap0,
               "gc_objects": (objs0, objs1), "tensors": (tensors0, tensors1)}
    record_property("soak", figures)
    print(f"[soak] {figures}")
    H.assert_same_state(before, H.model_state(mp))
    assert _no_output_terms(mp)
    assert rss1 - rss0 < 0.05 * cycles * per_cycle, figures
    assert objs1 - objs0 < cycles / 4, figures
    assert tensors1 - tensors0 <= 2, figures
    assert heap1 - heap0 < 256 * 1024, figures

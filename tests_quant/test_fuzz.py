"""Seeded fuzzing of what strangers' files can hold: valid tiny checkpoints, Nunchaku files and LoRAs are
mutated (file bytes, header lengths, tensor shapes / dtypes / values, dropped and stray keys, layer JSON,
file metadata, LoRA alphas and strengths) and fed to the loaders.

The properties, for every mutation:

* only documented errors escape: a ``QuantFileError`` (the package's input errors, ``docs/reliability.md``);
  nothing else — no ``RuntimeError`` from torch, no ``KeyError``, no ``RecursionError``;
* a model is loaded fully or not at all: a returned model holds exactly the clean model's tensors (same
  keys, shapes and dtypes) and each of them equals the file's tensor (cast to the compute dtype), and it
  runs a forward;
* a LoRA on int4 layers applies every accepted patch (refused ones reported; at a bad strength every one is
  refused); patching never raises, a model whose output was finite stays finite (alphas of 1e15 and 1e30
  times strengths up to ±100 included), and unpatching restores it bit for bit;
* an output path ``convert-nunchaku`` must not write (a FIFO, a symlink, a directory, an existing file without
  ``--force``, a missing folder, the input) is refused before anything is written, and the folder is as it
  was; a write cut at any tensor (``^C``, SIGTERM / SIGHUP as the CLI raises them, an OS error) leaves no
  output, no temporary file, and an output ``--force`` would replace keeps its bytes.

Hypothesis runs derandomized (the same examples on every run, no example database). The CI run is
``FUZZ_EXAMPLES`` examples per target; ``COMFY_INT4_FUZZ=N`` runs N per target (the long run recorded in
``docs/reliability.md``).
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import comfy.sd
import comfy.utils
from comfy.quant.errors import QuantFileError
from fuzz_mutations import (apply_byte_mutation, apply_tensor_mutation, byte_mutations, interrupts, make_output,
                            output_cases, strengths, tensor_mutations)
import lora_helpers as H
from lora_helpers import IN_CH, TXT_DIM, checkpoint

FUZZ_EXAMPLES = int(os.environ.get("COMFY_INT4_FUZZ", "40"))
# no shrinking: a mutation is already small, and shrinking re-runs slow loads for minutes
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
FP32 = {"dtype": torch.float32}
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    """Print, per target, how many mutated files loaded whole and which documented errors refused the rest."""
    start = time.perf_counter()
    yield
    for target, counts in sorted(OUTCOMES.items()):
        print(f"\n[fuzz] {target}: {sum(counts.values())} examples: " + ", ".join(f"{k} {v}" for k, v in
                                                                                  counts.most_common()))
    print(f"[fuzz] {FUZZ_EXAMPLES} examples per target, {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------ files
def _clean_int4():
    sd, meta = checkpoint()
    return sd, meta


def _save(path, sd, meta):
    comfy.utils.save_torch_file(sd, path, metadata=meta)
    return path


def _expected_tensors(model) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if not k.endswith("comfy_quant")}


@pytest.fixture(scope="module")
def clean_layout(tmp_path_factory):
    """The clean int4 file's bytes and the keys / shapes / dtypes of the model it loads into."""
    path = _save(tmp_path_factory.mktemp("fuzz") / "clean.safetensors", *_clean_int4())
    model = comfy.sd.load_diffusion_model(path, model_options=FP32).model.diffusion_model
    return path.read_bytes(), _expected_tensors(model)


def _load_or_refuse(path, target):
    """The loaded diffusion model, or None when a documented error refused the file."""
    try:
        model = comfy.sd.load_diffusion_model(path, model_options=FP32).model.diffusion_model
    except QuantFileError as e:
        OUTCOMES[target][type(e).__name__] += 1
        return None
    OUTCOMES[target]["loaded whole"] += 1
    return model


def _assert_whole(model, expected, file_sd):
    """Exactly the clean model's tensors, each equal to the file's (cast to the compute dtype), and a forward runs."""
    got = model.state_dict()
    assert _expected_tensors(model) == expected
    for key, t in got.items():
        if key.endswith("comfy_quant"):
            continue
        src = file_sd[key]
        assert torch.equal(t, src.to(t.dtype) if t.is_floating_point() else src.view(t.dtype)), key
    _forward(model)


def _forward(model):
    x = torch.randn(1, IN_CH // 4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 3, TXT_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x, torch.full((1,), 0.5), ctx)


def _file_tensors(path):
    import safetensors.torch
    return safetensors.torch.load_file(str(path))


@FUZZ
@given(mutation=byte_mutations())
def test_fuzz_file_bytes(clean_layout, tmp_path_factory, mutation):
    """Truncations, flipped header / data bytes and forged header lengths of the int4 file."""
    data, expected = clean_layout
    path = tmp_path_factory.mktemp("bytes") / "m.safetensors"
    path.write_bytes(apply_byte_mutation(data, mutation))
    model = _load_or_refuse(path, "file bytes")
    if model is not None:
        _assert_whole(model, expected, _file_tensors(path))


@FUZZ
@given(mutation=tensor_mutations(*_clean_int4()))
@example(mutation=("shape", "img_in.weight", "unsqueeze"))  # found by a long run: detection unpacked a 3-D shape
def test_fuzz_int4_checkpoint(clean_layout, tmp_path_factory, mutation):
    """Dropped, stray, reshaped, retyped or NaN / Inf / 0 / huge tensors; layer JSON and file metadata."""
    _, expected = clean_layout
    sd, meta = _clean_int4()
    apply_tensor_mutation(sd, meta, mutation)
    path = _save(tmp_path_factory.mktemp("int4") / "m.safetensors", sd, meta)
    model = _load_or_refuse(path, "int4 tensors and metadata")
    if model is not None:
        _assert_whole(model, expected, _file_tensors(path))


def _clean_nunchaku():
    import nunchaku_fixtures as F
    return F.to_nunchaku(F.make_natural(seed=3))


@FUZZ
@given(mutation=tensor_mutations(*_clean_nunchaku()))
@example(mutation=("shape", "img_in.weight", "unsqueeze"))  # found by a long run: detection unpacked a 3-D shape
def test_fuzz_nunchaku_checkpoint(tmp_path_factory, mutation):
    """The same mutations on a Nunchaku file, loaded directly and through convert-nunchaku: both refuse with
    a documented error or both load; the converter leaves no output behind when it refuses."""
    from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
    sd, meta = _clean_nunchaku()
    apply_tensor_mutation(sd, meta, mutation)
    d = tmp_path_factory.mktemp("nunchaku")
    import safetensors.torch
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "n.safetensors"), metadata=meta)
    direct = _load_or_refuse(d / "n.safetensors", "Nunchaku direct load")
    try:
        convert_nunchaku_file(str(d / "n.safetensors"), str(d / "c.safetensors"), progress=False)
        converted = _load_or_refuse(d / "c.safetensors", "Nunchaku converted")
    except QuantFileError:
        assert not any(p.name.startswith("c.safetensors") for p in d.iterdir()), "converter left a file behind"
        converted = None
    assert (direct is None) == (converted is None), "direct load and convert-then-load disagree"
    if direct is not None:
        assert _expected_tensors(direct) == _expected_tensors(converted)
        for k, v in direct.state_dict().items():
            assert torch.equal(v, converted.state_dict()[k]), k


# int4 targets only: patches on float weights are queued unchecked, as upstream queues them
LORA_PATHS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.img_mod.1",
              "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.1.attn.to_out.0")


@pytest.fixture(scope="module")
def lora_base():
    """The tiny int4 model (SVDQuant, AWQ and float targets), its state, its output and a valid LoRA."""
    patcher = H.load_model()
    lora, _ = H.lora_for(patcher, LORA_PATHS, r=4, alpha=2.0, seed=5)
    return patcher, H.model_state(patcher), _forward(patcher.model.diffusion_model), lora


@FUZZ
@given(mutation=tensor_mutations(H.lora_for(H.load_model(), LORA_PATHS, r=4, alpha=2.0, seed=5)[0], {},
                                 values=(math.nan, math.inf, -math.inf, 0.0, 1e30, 1e15)),
       strength=strengths())
def test_fuzz_lora(lora_base, mutation, strength):
    """A mutated LoRA on int4 layers at any strength: the patches that pass the checks apply (none at a bad
    strength: each is refused); patch_model never raises, the finite output stays finite, and unpatching
    restores every tensor bit for bit."""
    patcher, state, base_out, clean = lora_base
    lora = {k: v.clone() for k, v in clean.items()}
    apply_tensor_mutation(lora, {}, mutation)
    patched = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)[0]
    if not (math.isfinite(strength) and abs(strength) <= 100):
        OUTCOMES["LoRA"]["refused (strength)"] += 1
        assert patched.patches == {}
    OUTCOMES["LoRA"][f"applied {len(patched.patches)} of {len(LORA_PATHS)} modules"] += 1
    patched.patch_model()
    try:
        out = _forward(patched.model.diffusion_model)
        assert bool(torch.isfinite(out).all()) or not bool(torch.isfinite(base_out).all())
    finally:
        patched.unpatch_model()
    H.assert_same_state(state, H.model_state(patcher))
    assert torch.equal(_forward(patcher.model.diffusion_model), base_out)


def test_the_lora_property_fails_without_the_checks(lora_base, monkeypatch):
    """Negative control: with the adapter check switched off, a NaN factor reaches the output."""
    import comfy.quant.patching
    patcher, _, base_out, clean = lora_base
    lora = {k: v.clone() for k, v in clean.items()}
    apply_tensor_mutation(lora, {}, ("value", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", 0.0,
                                     math.nan))
    monkeypatch.setattr(comfy.quant.patching, "adapter_problem", lambda *a, **k: None)
    patched = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]
    patched.patch_model()
    try:
        assert bool(torch.isfinite(base_out).all()) and not bool(torch.isfinite(_forward(patched.model.diffusion_model)).all())
    finally:
        patched.unpatch_model()


def test_the_mutations_are_not_vacuous(clean_layout, tmp_path):
    """Negative control for the properties: the clean file passes them, and a hand-made half-loaded
    model (a bias left as garbage) fails ``_assert_whole``."""
    data, expected = clean_layout
    path = tmp_path / "clean.safetensors"
    path.write_bytes(data)
    model = _load_or_refuse(path, "negative control")
    assert model is not None
    file_sd = _file_tensors(path)
    _assert_whole(model, expected, file_sd)
    model.transformer_blocks[0].attn.to_q.bias.data.fill_(7.0)
    with pytest.raises(AssertionError):
        _assert_whole(model, expected, file_sd)
    assert struct.unpack("<Q", data[:8])[0] < len(data)
    assert json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])


# ------------------------------------------------------------------------------------------ outputs
@pytest.fixture(scope="module")
def nunchaku_file(tmp_path_factory):
    sd, meta = _clean_nunchaku()
    path = tmp_path_factory.mktemp("nunchaku_src") / "n.safetensors"
    comfy.utils.save_torch_file(sd, path, metadata=meta)
    return path


def _state(d):
    return sorted((p.name, p.is_symlink(), p.is_fifo(), p.is_dir(),
                   p.read_bytes() if p.is_file() and not p.is_symlink() else b"") for p in d.iterdir())


@FUZZ
@given(case=output_cases())
def test_fuzz_output_paths(nunchaku_file, tmp_path_factory, case):
    """Any output kind, with or without --force: refused with OutputFileError and the folder unchanged, or
    written as a regular file that loads."""
    from comfy.quant.errors import OutputFileError
    from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
    kind, force = case
    d = tmp_path_factory.mktemp("out")
    out, src = make_output(kind, d, nunchaku_file)
    before = _state(d)
    try:
        convert_nunchaku_file(str(src), str(out), progress=False, overwrite=force)
    except OutputFileError:
        OUTCOMES["outputs"][f"{kind}: refused"] += 1
        assert _state(d) == before
        assert kind != "new" and not (kind == "existing" and force)
        return
    OUTCOMES["outputs"][f"{kind}: written"] += 1
    assert kind == "new" or (kind == "existing" and force)
    assert out.is_file() and not out.is_symlink() and not [p for p in d.iterdir() if p.name.endswith(".partial")]
    comfy.sd.load_diffusion_model(str(out), model_options=FP32)


@FUZZ
@given(cut=interrupts(), existing=st.booleans())
def test_fuzz_interrupted_writes(nunchaku_file, tmp_path_factory, cut, existing):
    """A write cut at any tensor leaves no output and no temporary file; a replaced output keeps its bytes."""
    import signal

    from comfy.quant_tools import safetensors_stream
    from comfy.quant_tools.cli import Terminated
    from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
    kind, frac = cut
    error = {"KeyboardInterrupt": KeyboardInterrupt(), "Terminated": Terminated(signal.SIGTERM),
             "OSError": OSError(28, "No space left on device")}[kind]
    d = tmp_path_factory.mktemp("cut")
    out = d / "o.safetensors"
    if existing:
        out.write_bytes(b"earlier")
    cut_at = int(frac * _tensor_count(nunchaku_file))
    real_add, written = safetensors_stream.StreamingSafetensorsWriter.add, []

    def add(self, name, tensor):
        if len(written) == cut_at:
            raise error
        written.append(name)
        return real_add(self, name, tensor)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safetensors_stream.StreamingSafetensorsWriter, "add", add)
        with pytest.raises(type(error)):
            convert_nunchaku_file(str(nunchaku_file), str(out), progress=False, overwrite=existing)
    OUTCOMES["interrupted writes"][kind] += 1
    assert len(written) == cut_at
    assert sorted(p.name for p in d.iterdir()) == (["o.safetensors"] if existing else [])
    if existing:
        assert out.read_bytes() == b"earlier"


@functools.lru_cache(maxsize=None)
def _tensor_count(path) -> int:
    """How many tensors converting ``path`` writes (the clean conversion's output)."""
    import tempfile
    from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
    with tempfile.TemporaryDirectory() as d:
        convert_nunchaku_file(str(path), os.path.join(d, "c.safetensors"), progress=False)
        return len(comfy.utils.load_torch_file(os.path.join(d, "c.safetensors")))

"""Files in ComfyUI PR #13580's key spellings, and files whose tensors carry ``model.diffusion_model.``.

PR #13580 (upstream, open) names SVDQuant's side tensors ``proj_down`` / ``proj_up`` / ``smooth_factor`` and
AWQ's zero points ``weight_zero``; this package writes comfy-kitchen's ``weight_proj_down`` / ... /
``weight_zeros`` and reads both (``comfy.quant.formats.base.SPELLING_WRITERS``). Its layer JSON may carry no
``act_unsigned``: the post-GELU layers (``img_mlp.net.2`` / ``txt_mlp.net.2``) then default to true, as the PR
does. Each file here is made from the tiny int4 Qwen-Image checkpoint of ``lora_helpers`` by renaming or
prefixing keys (the tensors are the same), so the native file is the control: every int4 layer's output
must be bit-identical to it (same tensors, same code path) and within the derived kernel bound
(``reference.kernel_tolerance``: 2·(4u + K·2⁻²⁴)·Σ|terms| for fp32) of the float64 reference computed from the
stored tensors.
"""
import hashlib
import json

import pytest
import torch

import comfy.nodes
import comfy.utils
import nunchaku_packer as P
from comfy.quant import kitchen
from comfy.quant.errors import QuantizedLayerError
from comfy.quant.formats import decode_config, encode_config
from comfy.quant.nunchaku import is_native_int4, is_nunchaku_checkpoint
from comfy.quant_tools import cli
from comfy.quant_tools.inspect_file import inspect_checkpoint
from lora_helpers import checkpoint
from reference import awq_forward, kernel_tolerance, svdquant_forward

PR_SPELLING = {"weight_proj_down": "proj_down", "weight_proj_up": "proj_up",
               "weight_smooth_factor": "smooth_factor", "weight_zeros": "weight_zero"}
HEADER = "_quantization_metadata"
PREFIX = "model.diffusion_model."
MLP = "transformer_blocks.0.img_mlp.net.2"
TO_Q = "transformer_blocks.0.attn.to_q"


def _renamed(key: str) -> str:
    layer, _, name = key.rpartition(".")
    return f"{layer}.{PR_SPELLING.get(name, name)}"


def _layers(meta) -> dict:
    return json.loads(meta[HEADER])["layers"]


def pr13580(sd, meta, per_layer_json: bool):
    """The checkpoint as PR #13580 would write it: its key spellings, layer JSON holding only the format
    (no act_unsigned, rank or group_size), per layer (``comfy_quant`` tensors) or in the header only."""
    minimal = {layer: {"format": conf["format"]} for layer, conf in _layers(meta).items()}
    out = {_renamed(k): v for k, v in sd.items() if not k.endswith(".comfy_quant")}
    if per_layer_json:
        out.update({f"{layer}.comfy_quant": encode_config(conf) for layer, conf in minimal.items()})
        return out, {}
    return out, {HEADER: json.dumps({"format_version": "1.0", "layers": minimal})}


def prefixed(sd, meta):
    """Every tensor under ``model.diffusion_model.``, the header's layer names without it (what ComfyUI's
    checkpoint savers can produce)."""
    return {PREFIX + k: v for k, v in sd.items() if not k.endswith(".comfy_quant")}, dict(meta)


def _save(tmp_path, name, sd, meta):
    path = tmp_path / "diffusion_models" / name
    path.parent.mkdir(exist_ok=True)
    comfy.utils.save_torch_file(sd, path, metadata=meta)
    return path


def _unet_loader(tmp_path, monkeypatch, name):
    monkeypatch.setenv("COMFYUI_MODELS_DIR", str(tmp_path))
    return comfy.nodes.UNETLoader().load_unet(name, "fp32")[0].model.diffusion_model


def _int4_modules(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                       kitchen.QuantizedTensor)}


def _reference(sd, meta, layer, x):
    """float64 reference output and its bound for ``layer`` of the native checkpoint ``sd``."""
    p = f"{layer}."
    t = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    conf = _layers(meta)[layer]
    if conf["format"] == "awq_w4a16":
        ref, mag = awq_forward(x, t, conf["group_size"], t["bias"])
    else:
        ref, mag = svdquant_forward(x, t, conf["act_unsigned"], t["bias"], torch.float32)
    return ref, kernel_tolerance(mag, torch.float32, x.shape[-1])


@pytest.fixture(scope="module")
def native():
    return checkpoint()


@pytest.fixture
def native_model(native, tmp_path, monkeypatch):
    _save(tmp_path, "native.safetensors", *native)
    return _unet_loader(tmp_path, monkeypatch, "native.safetensors")


@pytest.mark.parametrize("variant", ["pr13580 header JSON", "pr13580 per-layer JSON", "prefixed"])
def test_file_loads_through_unetloader_bit_identical_to_native(native, native_model, tmp_path, monkeypatch,
                                                               variant):
    sd, meta = native
    if variant == "prefixed":
        other_sd, other_meta = prefixed(sd, meta)
    else:
        other_sd, other_meta = pr13580(sd, meta, per_layer_json=variant.endswith("per-layer JSON"))
    path = _save(tmp_path, "other.safetensors", other_sd, other_meta)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    other = _int4_modules(_unet_loader(tmp_path, monkeypatch, "other.safetensors"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the input is never written
    mods = _int4_modules(native_model)
    assert sorted(other) == sorted(mods) and len(mods) == len(_layers(meta))
    g = torch.Generator().manual_seed(0)
    for layer, module in mods.items():
        x = torch.randn(3, module.in_features, generator=g)
        with torch.no_grad():
            y, y_other = module(x), other[layer](x)
        assert torch.equal(y, y_other), layer
        ref, tol = _reference(sd, meta, layer, x)
        assert bool(((y.double() - ref).abs() <= tol).all()), layer
    mlp = other[MLP].weight._params
    assert mlp.act_unsigned is True and other[TO_Q].weight._params.act_unsigned is False


def test_negative_controls_act_unsigned_default_matters(native, native_model):
    """The bound above can fail: the post-GELU layer's reference with the other signedness is far outside it,
    and an explicit ``act_unsigned: false`` (which wins over the default) changes the output."""
    sd, meta = native
    module = _int4_modules(native_model)[MLP]
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(1)).abs()  # GELU-like input
    p = f"{MLP}."
    t = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    wrong, mag = svdquant_forward(x, t, False, t["bias"], torch.float32)
    with torch.no_grad():
        y = module(x)
    assert not bool(((y.double() - wrong).abs() <= kernel_tolerance(mag, torch.float32, x.shape[-1])).all())


def test_explicit_act_unsigned_false_wins_over_the_default(native, tmp_path, monkeypatch, native_model):
    sd, meta = native
    pr_sd, pr_meta = pr13580(sd, meta, per_layer_json=True)
    pr_sd[f"{MLP}.comfy_quant"] = encode_config({"format": "svdquant_w4a4", "act_unsigned": False})
    _save(tmp_path, "explicit.safetensors", pr_sd, pr_meta)
    module = _int4_modules(_unet_loader(tmp_path, monkeypatch, "explicit.safetensors"))[MLP]
    assert module.weight._params.act_unsigned is False
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(2)).abs()
    with torch.no_grad():
        assert not torch.equal(module(x), _int4_modules(native_model)[MLP](x))


def _mixed(sd):
    sd[f"{TO_Q}.weight_proj_up"] = sd.pop(f"{TO_Q}.proj_up")


def _doubled(sd):
    sd[f"{TO_Q}.weight_smooth_factor"] = sd[f"{TO_Q}.smooth_factor"].clone()


def _foreign(sd):
    sd[f"{TO_Q}.weight_zero"] = torch.zeros(4, 256, dtype=torch.bfloat16)


@pytest.mark.parametrize("edit, tensor, expected, got", [
    (_mixed, "weight_proj_up", "'proj_up' (the ComfyUI PR #13580 spelling of its 'proj_down')",
     "'weight_proj_up' (comfy-kitchen)"),
    (_doubled, "weight_smooth_factor", "one spelling", "both ['weight_smooth_factor', 'smooth_factor']"),
    (_foreign, "weight_zero", "only svdquant_w4a4 tensors", "'weight_zero', a tensor of awq_w4a16"),
], ids=["mixed spellings", "both spellings of one tensor", "another format's tensor"])
def test_spellings_that_make_no_layer_are_refused_by_name(native, tmp_path, monkeypatch, edit, tensor, expected,
                                                          got):
    sd, meta = pr13580(*native, per_layer_json=False)
    edit(sd)
    path = _save(tmp_path, "bad.safetensors", sd, meta)
    with pytest.raises(QuantizedLayerError) as info:
        _unet_loader(tmp_path, monkeypatch, "bad.safetensors")
    e = info.value
    assert (e.file, e.layer, e.tensor) == (str(path), TO_Q, tensor)
    assert str(e.expected).startswith(expected) and e.got == got
    assert any(TO_Q in p and tensor in p for p in inspect_checkpoint(path).problems)


def test_prefixed_header_that_names_no_layer_is_still_refused(native, tmp_path, monkeypatch):
    """Negative control of the prefix rule: a header whose names are no suffix of the tensors' layers."""
    sd, meta = prefixed(*native)
    layers = {f"other.{layer}": conf for layer, conf in _layers(meta).items()}
    meta[HEADER] = json.dumps({"format_version": "1.0", "layers": layers})
    _save(tmp_path, "bad.safetensors", sd, meta)
    with pytest.raises(QuantizedLayerError, match="quantization metadata for this layer") as info:
        _unet_loader(tmp_path, monkeypatch, "bad.safetensors")
    assert info.value.layer.startswith(PREFIX + "transformer_blocks.")


def test_act_unsigned_absent_on_an_input_split_layer_is_refused():
    """Flux's single-block linear2 reads a signed and a post-GELU part: no one default is right."""
    from comfy.quant.formats import resolve

    raw = encode_config({"format": "svdquant_w4a4"})
    with pytest.raises(QuantizedLayerError, match="in_splits") as info:
        resolve(raw, "single_blocks.3.linear2")
    assert (info.value.layer, info.value.tensor, info.value.got) == ("single_blocks.3.linear2",
                                                                     "comfy_quant.act_unsigned", "nothing")
    assert resolve(raw, "double_blocks.0.img_mlp.2")[1]["act_unsigned"] is True
    assert resolve(raw, "single_blocks.3.linear1")[1]["act_unsigned"] is False
    split = encode_config({"format": "svdquant_w4a4", "act_unsigned": [False, True], "in_splits": [64, 64]})
    assert resolve(split, "single_blocks.3.linear2")[1]["in_splits"] == [64, 64]


# ---- detection ----

def test_detection_tells_native_files_from_nunchaku(native):
    sd, meta = native
    for keys, metadata in (pr13580(sd, meta, True), pr13580(sd, meta, False), prefixed(sd, meta), native):
        assert is_native_int4(list(keys), metadata)
        assert not is_nunchaku_checkpoint(list(keys), metadata)
    stored, nmeta, _ = P.build_fake_qwen_image(num_blocks=1)
    assert is_nunchaku_checkpoint(stored.keys(), nmeta) and is_nunchaku_checkpoint(stored.keys(), None)
    assert not is_native_int4(stored.keys(), nmeta)
    # a native marker wins over Nunchaku-looking metadata (a converted file may keep it)
    assert not is_nunchaku_checkpoint(["a.comfy_quant"], {"model_class": "NunchakuQwenImageTransformer2DModel"})
    # PR #13580's names alone no longer say "Nunchaku"; Nunchaku-only names still do
    assert not is_nunchaku_checkpoint(["a.smooth_factor", "a.proj_down", "a.weight"], {})
    assert is_nunchaku_checkpoint(["a.qweight", "a.smooth_factor"], {})


def test_pr13580_tensors_without_any_metadata_get_the_metadata_error(native, tmp_path, monkeypatch):
    """Not taken for a broken Nunchaku file: the loader says the layer has no quantization metadata."""
    sd, _ = pr13580(*native, per_layer_json=False)
    _save(tmp_path, "bare.safetensors", sd, {})
    with pytest.raises(QuantizedLayerError, match="quantization metadata for this layer") as info:
        _unet_loader(tmp_path, monkeypatch, "bare.safetensors")
    assert info.value.tensor in PR_SPELLING.values()


# ---- the tools ----

def _cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("variant", ["pr13580", "prefixed"])
def test_inspect_reports_int4_layers(native, tmp_path, capsys, variant):
    sd, meta = native
    other = pr13580(sd, meta, per_layer_json=False) if variant == "pr13580" else prefixed(sd, meta)
    path = _save(tmp_path, "m.safetensors", *other)
    report = inspect_checkpoint(path)
    assert report.kind == "comfyui" and not report.problems
    assert len(report.layers) == len(_layers(meta))
    names = {li.name for li in report.layers}
    want = set(_layers(meta)) if variant == "pr13580" else {PREFIX + layer for layer in _layers(meta)}
    assert names == want
    mlp = next(li for li in report.layers if li.name.endswith(MLP))
    assert (mlp.format, mlp.act_unsigned) == ("svdquant_w4a4", True)  # PR file: the default the loader applies
    note = "PR #13580" if variant == "pr13580" else f"prefix '{PREFIX}'"
    assert any(note in n for n in report.notes), report.notes
    code, out, _ = _cli(capsys, "inspect", path)
    assert code == 0 and "[comfyui]" in out and "problems: 0" in out


def test_quantize_and_convert_nunchaku_refuse_a_pr13580_file(native, tmp_path, capsys):
    path = _save(tmp_path, "m.safetensors", *pr13580(*native, per_layer_json=False))
    out = tmp_path / "out.safetensors"
    code, _, err = _cli(capsys, "quantize", path, out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "already a quantized checkpoint" in err, err
    code, _, err = _cli(capsys, "convert-nunchaku", path, out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "already native int4" in err, err
    assert "Nunchaku checkpoint, module" not in err and not out.exists()


def test_lora_check_on_a_pr13580_file(native, tmp_path, capsys):
    path = _save(tmp_path, "m.safetensors", *pr13580(*native, per_layer_json=False))
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "lora.safetensors"
    comfy.utils.save_torch_file({f"diffusion_model.{TO_Q}.lora_up.weight": torch.randn(256, 4, generator=g) * 0.1,
                                 f"diffusion_model.{TO_Q}.lora_down.weight": torch.randn(4, 256, generator=g) * 0.1},
                                lora)
    code, out, err = _cli(capsys, "lora-check", path, lora)
    assert code == 0, err
    row = next(line for line in out.splitlines() if TO_Q in line)
    assert "appended rank 4 to the low-rank branch" in row


def test_decoded_json_is_what_the_pr_file_holds(native):
    """The fixture itself: the PR-style file carries no act_unsigned anywhere (else the tests above prove less)."""
    sd, meta = pr13580(*native, per_layer_json=True)
    confs = [decode_config(v, k) for k, v in sd.items() if k.endswith(".comfy_quant")]
    assert confs and all(set(c) == {"format"} for c in confs)
    assert not any(k.endswith(tuple(f".{s}" for s in PR_SPELLING)) for k in sd)

"""Values and JSON a stranger's checkpoint decides (issue 10): NaN/Inf in any float side tensor or bias,
zero where a layer divides, hostile ``comfy_quant`` / metadata JSON, Nunchaku files with missing tensors.

Each is refused at load with the documented error naming layer and tensor (or accepted with a warning:
a zero ``weight_scale``), listed by ``inspect`` (exit 1), and refused by ``convert-nunchaku`` (exit 2, one
line, no output). The negative controls (the clean files, a tiny positive smoothing factor, zero points
of 0) load, so every refusal here is the check's doing. One tiny Qwen-Image block (dim 256, rank 32).
"""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

import comfy.sd
import nunchaku_fixtures as F
from comfy.quant_tools import cli
from comfy.quant.errors import MetadataError, OutputFileError, QuantizedLayerError, UnreadableFileError
from comfy.quant_tools.inspect_file import inspect_checkpoint
from comfy.quant.nunchaku import NunchakuConversionError
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
from factories import poisoned

FP32 = {"dtype": torch.float32}
NAN, INF = float("nan"), float("inf")
W4A4 = "transformer_blocks.0.attn.to_k"
AWQ = "transformer_blocks.0.img_mod.1"
NK_W4A4 = "transformer_blocks.0.attn.to_qkv"


@pytest.fixture(scope="module")
def natural():
    return F.make_natural(seed=0, num_blocks=1)


@pytest.fixture(scope="module")
def native(natural):
    return F.to_native(natural)


@pytest.fixture(scope="module")
def nunchaku(natural):
    return F.to_nunchaku(natural)


def write(tmp_path, sd, meta, name="model.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path), metadata=meta)
    return path


def with_tensor(checkpoint, key, tensor):
    sd, meta = checkpoint
    return {**sd, key: tensor}, meta


def load(path):
    return comfy.sd.load_diffusion_model(str(path), model_options=FP32)


def cli_run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ native int4 files

REFUSED = [(W4A4, t, v) for t in ("weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor",
                                  "bias") for v in ("nan", "inf", "-inf")]
REFUSED += [(AWQ, t, v) for t in ("weight_scale", "weight_zeros", "bias") for v in ("nan", "inf")]
REFUSED += [("img_in", "bias", "nan")]  # a float layer's bias: the same checked_bias


@pytest.mark.parametrize("layer,tensor,value", REFUSED,
                         ids=[f"{lay.split('.', 2)[-1]}-{t}-{v}" for lay, t, v in REFUSED])
def test_nonfinite_value_refused_naming_layer_and_tensor(native, tmp_path, layer, tensor, value):
    key = f"{layer}.{tensor}"
    first = (0,) * native[0][key].dim()
    path = write(tmp_path, *with_tensor(native, key, poisoned(native[0][key], float(value), first)))
    with pytest.raises(QuantizedLayerError) as info:
        load(path)
    e = info.value
    assert (e.file, e.layer, e.tensor, e.expected) == (str(path), layer, tensor, "finite values")
    assert e.got == f"1 {'NaN' if value == 'nan' else 'Inf'} (first at index {first})"


def test_counts_and_first_index(native, tmp_path):
    key = f"{W4A4}.weight_scale"
    bad = poisoned(native[0][key], NAN, (3, 0), (2, 5), (3, 1))
    bad[2, 7] = INF
    with pytest.raises(QuantizedLayerError, match=r"weight_scale: expected finite values, "
                                                  r"got 3 NaN, 1 Inf \(first at index \(2, 5\)\)"):
        load(write(tmp_path, *with_tensor(native, key, bad)))


def test_zero_smooth_factor_refused(native, tmp_path):
    key = f"{W4A4}.weight_smooth_factor"
    with pytest.raises(QuantizedLayerError) as info:
        load(write(tmp_path, *with_tensor(native, key, poisoned(native[0][key], 0.0, (7,), (9,)))))
    assert (info.value.layer, info.value.tensor) == (W4A4, "weight_smooth_factor")
    assert "non-zero" in info.value.expected and info.value.got == "2 zero(s) (first at index (7,))"


@pytest.mark.parametrize("layer", [W4A4, AWQ])
def test_zero_weight_scale_loads_with_one_warning(native, tmp_path, caplog, layer):
    key = f"{layer}.weight_scale"
    path = write(tmp_path, *with_tensor(native, key, poisoned(native[0][key], 0.0, (0, 0), (1, 3), (2, 9))))
    with caplog.at_level(logging.WARNING):
        patcher = load(path)
    warned = [r.getMessage() for r in caplog.records if "weight_scale" in r.getMessage()]
    assert len(warned) == 1 and layer in warned[0] and f"3 of {native[0][key].numel()}" in warned[0], warned
    assert patcher is not None
    report = inspect_checkpoint(path)
    assert report.problems == [] and any(layer in n and "weight_scale" in n for n in report.notes)


def test_negative_controls_load(native, tmp_path, caplog):
    """The clean file, a smoothing factor just above zero and zero points of exactly 0 load silently."""
    sd, meta = native
    smooth = poisoned(sd[f"{W4A4}.weight_smooth_factor"], 1e-30, (7,))
    assert 0 < float(smooth[7]) < 1e-29
    edited = {**sd, f"{W4A4}.weight_smooth_factor": smooth,
              f"{AWQ}.weight_zeros": torch.zeros_like(sd[f"{AWQ}.weight_zeros"])}
    for i, checkpoint in enumerate([(sd, meta), (edited, meta)]):
        with caplog.at_level(logging.WARNING):
            assert load(write(tmp_path, *checkpoint, name=f"ok{i}.safetensors")) is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "quantized layer" in r.getMessage()]


def test_inspect_lists_value_problems_and_exits_1(native, tmp_path, capsys):
    good = write(tmp_path, *native, name="good.safetensors")
    assert inspect_checkpoint(good).problems == []
    assert cli_run(capsys, "inspect", good)[0] == 0
    sd, meta = native
    bad = {**sd, f"{W4A4}.weight_proj_up": poisoned(sd[f"{W4A4}.weight_proj_up"], NAN, (4, 1)),
           f"{AWQ}.bias": poisoned(sd[f"{AWQ}.bias"], INF, (5,)),
           "transformer_blocks.0.attn.to_q.weight_smooth_factor":
               poisoned(sd["transformer_blocks.0.attn.to_q.weight_smooth_factor"], 0.0, (3,))}
    path = write(tmp_path, bad, meta, name="bad.safetensors")
    problems = inspect_checkpoint(path).problems
    assert len(problems) == 3, problems
    assert any(f"'{W4A4}': weight_proj_up: expected finite values, got 1 NaN (first at index (4, 1))" in p
               for p in problems)
    assert any(f"'{AWQ}': bias: expected finite values, got 1 Inf" in p for p in problems)
    assert any("attn.to_q': weight_smooth_factor: expected non-zero" in p for p in problems)
    code, out, _ = cli_run(capsys, "inspect", path)
    assert code == 1 and "problems: 3" in out


def test_inspect_unreadable_file(tmp_path, native, capsys):
    good = write(tmp_path, *native, name="good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    for path in (cut, tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(UnreadableFileError) as info:
            inspect_checkpoint(path)
        assert info.value.file == str(path)
    code, _, err = cli_run(capsys, "inspect", cut)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {cut}: cannot read as safetensors"), err


DEEP = "[" * 40 + "]" * 40
HOSTILE_JSON = {
    "deep": '{"format": "svdquant_w4a4", "x": ' + DEEP + "}",
    "very_deep": "[" * 50000 + "]" * 50000,     # over the size bound too
    "recursion": "[" * 30000 + "]" * 30000,     # within the size bound: json would recurse past the limit
    "oversized": json.dumps({"format": "svdquant_w4a4", "pad": "x" * 70000}),
    "not_utf8": None,                          # bytes 0xFF 0xFE
    "rank_text": '{"format": "svdquant_w4a4", "rank": "32"}',
    "group_float": '{"format": "svdquant_w4a4", "group_size": 64.0}',
    "unsigned_int": '{"format": "svdquant_w4a4", "act_unsigned": 1}',
}


@pytest.mark.parametrize("case", list(HOSTILE_JSON))
def test_hostile_comfy_quant_json_is_a_layer_error(native, tmp_path, case):
    text = HOSTILE_JSON[case]
    raw = (torch.tensor([0xFF, 0xFE], dtype=torch.uint8) if case == "not_utf8" else F.text_u8(text))
    path = write(tmp_path, *with_tensor(native, f"{W4A4}.comfy_quant", raw))
    with pytest.raises(QuantizedLayerError) as info:
        load(path)
    assert info.value.layer == W4A4 and info.value.tensor.startswith("comfy_quant"), info.value
    report = inspect_checkpoint(path)
    assert len(report.problems) == 1 and W4A4 in report.problems[0]


def test_awq_group_size_types(native, tmp_path):
    for group, field in ((0, "group_size"), (True, "group_size"), ("64", "group_size"), (96, "weight")):
        raw = F.json_u8({"format": "awq_w4a16", "group_size": group})
        with pytest.raises(QuantizedLayerError) as info:
            load(write(tmp_path, *with_tensor(native, f"{AWQ}.comfy_quant", raw)))
        assert info.value.layer == AWQ and info.value.tensor.endswith(field), (group, info.value)


def test_deep_quantization_header_listed_by_inspect(native, tmp_path):
    sd, meta = native
    path = write(tmp_path, sd, {**meta, "_quantization_metadata": '{"layers": ' + "[" * 5000 + "]" * 5000 + "}"})
    problems = inspect_checkpoint(path).problems
    assert len(problems) == 1 and "_quantization_metadata" in problems[0] and "nested" in problems[0], problems


# ------------------------------------------------------------------ Nunchaku files

NK_REFUSED = [(NK_W4A4, t, v) for t in ("wscales", "smooth_factor", "proj_down", "proj_up", "bias")
              for v in ("nan", "inf")]
NK_REFUSED += [(AWQ, t, v) for t in ("wscales", "wzeros", "bias") for v in ("nan", "inf")]
NK_REFUSED += [(NK_W4A4, "smooth_factor", "0")]


@pytest.mark.parametrize("module,tensor,value", NK_REFUSED,
                         ids=[f"{m.split('.', 2)[-1]}-{t}-{v}" for m, t, v in NK_REFUSED])
def test_nunchaku_value_refused_naming_module_and_tensor(nunchaku, tmp_path, module, tensor, value):
    key = f"{module}.{tensor}"
    at = (5,) if nunchaku[0][key].dim() == 1 else (1, 5)
    path = write(tmp_path, *with_tensor(nunchaku, key, poisoned(nunchaku[0][key], float(value), at)))
    with pytest.raises(NunchakuConversionError) as info:
        load(path)
    e = info.value
    assert (e.file, e.layer, e.tensor) == (str(path), module, tensor)
    assert e.expected == ("finite values" if value != "0" else "non-zero values (the layer divides by them)")
    assert f"first at index {at}" in e.got
    problems = inspect_checkpoint(path).problems
    assert len(problems) == 1 and f"module '{module}', tensor '{tensor}'" in problems[0], problems


def test_nunchaku_awq_padding_rows_are_not_checked(nunchaku, tmp_path):
    """Group rows past K/64 are padding the conversion drops: a NaN there is no problem (negative control
    for the AWQ cases above, which poison row 1 of 4 real groups)."""
    key = f"{AWQ}.wscales"
    assert nunchaku[0][key].shape[0] == 16
    path = write(tmp_path, *with_tensor(nunchaku, key, poisoned(nunchaku[0][key], NAN, (12, 3))))
    assert inspect_checkpoint(path).problems == []
    assert load(path) is not None


def test_convert_nunchaku_with_nan_exits_2_leaving_nothing(nunchaku, tmp_path, capsys):
    key = "transformer_blocks.0.txt_mlp.net.2.proj_up"  # late in the file: earlier modules were written
    src = write(tmp_path, *with_tensor(nunchaku, key, poisoned(nunchaku[0][key], NAN, (2, 3))), name="nk.safetensors")
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli_run(capsys, "convert-nunchaku", src, out)
    assert code == 2 and "wrote" not in stdout
    assert err.strip().splitlines() == [f"error: {src}: Nunchaku checkpoint, module 'transformer_blocks.0.txt_mlp."
                                        "net.2', tensor 'proj_up': expected finite values, got 1 NaN (first at index "
                                        "(2, 3))"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nk.safetensors"]
    code, out_text, _ = cli_run(capsys, "inspect", src)
    assert code == 1 and "txt_mlp.net.2" in out_text


def test_convert_nunchaku_clean_file_and_overwrite(nunchaku, tmp_path):
    src, out = write(tmp_path, *nunchaku, name="nk.safetensors"), tmp_path / "out.safetensors"
    convert_nunchaku_file(str(src), str(out), progress=False)
    with pytest.raises(OutputFileError, match="exists"):
        convert_nunchaku_file(str(src), str(out), progress=False)
    convert_nunchaku_file(str(src), str(out), progress=False, overwrite=True)
    assert load(out) is not None and inspect_checkpoint(out).problems == []


@pytest.mark.parametrize("drop", ["attn.to_qkv.qweight", "img_mod.1.qweight", "attn.to_qkv.proj_up",
                                  "img_mod.1.wzeros"])
def test_nunchaku_module_missing_a_tensor(nunchaku, tmp_path, drop):
    sd, meta = nunchaku
    module, _, tensor = f"transformer_blocks.0.{drop}".rpartition(".")
    path = write(tmp_path, {k: v for k, v in sd.items() if k != f"{module}.{tensor}"}, meta)
    with pytest.raises(NunchakuConversionError) as info:
        load(path)
    if drop == "img_mod.1.wzeros":  # without wzeros, the module reads as W4A4, which modulation is not
        assert info.value.layer == module and "wzeros" in str(info.value)
    else:
        assert (info.value.layer, info.value.tensor, info.value.got) == (module, tensor, "missing")
    assert inspect_checkpoint(path).problems


@pytest.mark.parametrize("entry,edit,field", [
    ("config", {"num_attention_heads": "four"}, "num_attention_heads"),
    ("config", {"attention_head_dim": []}, "attention_head_dim"),
    ("config", {"num_attention_heads": 2.5}, "num_attention_heads"),
    ("config", "not json", None),
    ("config", "[1, 2]", None),
    ("quantization_config", "{" * 10000, None),
    ("quantization_config", '{"method": "svdquant", "weight": ' + DEEP + "}", None),
], ids=["heads_text", "head_dim_list", "heads_float", "config_not_json", "config_list", "qconfig_recursion",
        "qconfig_deep"])
def test_nunchaku_metadata_errors_name_the_entry(nunchaku, tmp_path, entry, edit, field):
    sd, meta = nunchaku
    value = json.dumps({**json.loads(meta[entry]), **edit}) if isinstance(edit, dict) else edit
    path = write(tmp_path, sd, {**meta, entry: value})
    with pytest.raises((MetadataError, NunchakuConversionError)) as info:
        load(path)
    assert info.value.file == str(path) and f"metadata '{entry}'" in str(info.value), info.value
    if field:
        assert field in str(info.value.expected)
    assert inspect_checkpoint(path).problems


def test_convert_refuses_files_that_are_not_nunchaku(native, tmp_path, capsys):
    sd, meta = native
    converted = write(tmp_path, sd, meta, name="converted.safetensors")
    float_model = write(tmp_path, {k: v for k, v in sd.items() if k.startswith(("img_in.", "txt_in."))}, {},
                        name="float.safetensors")
    for src, says in ((converted, "already converted"), (float_model, "not a Nunchaku checkpoint")):
        out = tmp_path / "out.safetensors"
        with pytest.raises(NunchakuConversionError, match=says) as info:
            convert_nunchaku_file(str(src), str(out), progress=False)
        assert info.value.file == str(src) and not out.exists()
        code, _, err = cli_run(capsys, "convert-nunchaku", src, out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]

"""A user's mistakes meet one line on stderr and a non-zero exit, not a traceback (``-v`` shows it);
every input error is a ``QuantFileError`` naming the file, raised with its own type by the loaders."""
import argparse
import functools
import logging
import math
import os
import re
import stat

import pytest
import torch

import comfy.quant_tools.demo
import comfy.sd
import comfy.utils
import kernel_env
from factories import cli_model_files
from comfy.quant import kernels
from comfy.quant_tools import cli, quantizer
from comfy.quant_tools.demo import DemoConfig, agreement, demo_inputs, synthetic_state_dict
from comfy.quant.errors import (OutputFileError, QuantFileError, QuantizedLayerError, QuantizeInputError,
                                UnreadableFileError)
from comfy.quant_tools.inspect_file import inspect_checkpoint
from comfy.quant.nunchaku import NunchakuConversionError
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file
from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file

def _run(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_one_hierarchy_of_value_errors():
    for cls in (QuantizedLayerError, NunchakuConversionError, UnreadableFileError):
        assert issubclass(cls, QuantFileError) and issubclass(cls, ValueError)
    e = QuantizedLayerError("blocks.0.attn", "weight_scale", (2, 3), (3, 2))
    assert (e.layer, e.tensor, e.expected, e.got, e.file) == ("blocks.0.attn", "weight_scale", (2, 3), (3, 2), None)
    assert e.with_file("m.safetensors") is e and str(e).startswith("m.safetensors: quantized layer 'blocks.0.attn'")
    assert e.with_file("other.safetensors").file == "m.safetensors"  # the first file named stays


@pytest.mark.parametrize("kind", ["missing", "directory", "truncated", "garbage"])
def test_unreadable_files_name_the_path(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind != "missing":
        good = tmp_path / "good.safetensors"
        comfy.utils.save_torch_file({"w": torch.randn(64, 64)}, good)
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x07" * 300)
    with pytest.raises(UnreadableFileError) as info:
        comfy.utils.load_torch_file(path)
    assert info.value.file == str(path) and str(info.value).startswith(f"{path}: cannot read as safetensors")


def test_loader_keeps_the_layer_error_type_and_names_the_file(tmp_path):
    src, good = tmp_path / "bf16.safetensors", tmp_path / "int4.safetensors"
    comfy.utils.save_torch_file(synthetic_state_dict(DemoConfig(num_layers=1)), src)
    quantize_file(src, good, QuantizeOptions(rank=8), progress=False)
    sd, metadata = comfy.utils.load_torch_file(good, return_metadata=True)
    key = "transformer_blocks.0.attn.to_q.weight_scale"
    sd[key] = sd[key][:1]  # wrong shape
    bad = tmp_path / "bad.safetensors"
    comfy.utils.save_torch_file(sd, bad, metadata=metadata)
    with pytest.raises(QuantizedLayerError) as info:
        comfy.sd.load_diffusion_model(bad)
    assert info.value.file == str(bad) and info.value.tensor == "weight_scale"
    assert str(info.value).startswith(f"{bad}: quantized layer 'transformer_blocks.0.attn.to_q'")


@pytest.mark.parametrize("make", ["missing", "directory", "garbage"])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, make):
    model = tmp_path / "model.safetensors"
    if make == "directory":
        model.mkdir()
    elif make == "garbage":
        model.write_bytes(b"not a safetensors file at all")
    lora = tmp_path / "lora.safetensors"
    comfy.utils.save_torch_file({"x.lora_A.weight": torch.zeros(1, 1)}, lora)
    code, err = _run(capsys, "lora-check", str(model), str(lora))
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}: "), err


@pytest.mark.parametrize("where", ["before", "after"], ids=["-v COMMAND", "COMMAND ARGS -v"])
def test_cli_verbose_shows_the_traceback_and_keeps_the_exit_status(tmp_path, capsys, where):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"garbage")
    argv = ["lora-check", str(model), str(model)]
    code, err = _run(capsys, *(["-v", *argv] if where == "before" else [*argv, "-v"]))
    assert code == 2, err
    assert "Traceback (most recent call last)" in err and "UnreadableFileError" in err
    assert err.strip().splitlines()[-1].startswith(f"error: {model}: cannot read as safetensors")
    code, err = _run(capsys, *argv)  # control: without -v, one line
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- the CLI as a user tool
TINY = DemoConfig(num_layers=1, latent_size=8, text_tokens=4)
TO_Q = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A float Qwen-Image file, its int4 file (rank 8) and a Nunchaku file, in a folder of their own."""
    return cli_model_files(tmp_path_factory.mktemp("cli"), TINY)


def _one_error_line(err: str, starts: str) -> str:
    """The single line on stderr besides progress bars, which must start with ``starts``; never a traceback."""
    lines = [line for line in err.strip().splitlines() if line and not re.search(r"\d+%\|", line)]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(starts), err
    return lines[0]


def _no_work(monkeypatch):
    """Make any quantization work an internal error (exit 3), so a refusal proves it came first."""
    def work(*_args, **_kwargs):
        raise AssertionError("work started")
    monkeypatch.setattr(quantizer, "_write", work)


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def _loads_and_runs(path):
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    with torch.no_grad():
        y = patcher.model.diffusion_model(*demo_inputs(TINY))
    assert torch.isfinite(y).all()
    return patcher


def _save_variant(sd, path, **changes):
    comfy.utils.save_torch_file({**sd, **changes}, path)
    return path


# ---- quantize: inputs it cannot use, refused before any work, by the library and the CLI ----

def _wrong_input(kind, files, d):
    sd = files["sd"]
    if kind == "unrelated":
        return _save_variant({}, d / "unrelated.safetensors", **{"down_blocks.0.weight": torch.randn(8, 8)})
    if kind == "prefixed":
        return _save_variant({f"model.diffusion_model.{k}": v for k, v in sd.items()}, d / "prefixed.safetensors")
    if kind == "no txt_norm":
        return _save_variant({k: v for k, v in sd.items() if k != "txt_norm.weight"}, d / "flux-like.safetensors")
    if kind == "fp8 weight":
        fp8 = sd[f"{TO_Q}.weight"].to(torch.float8_e4m3fn)
        return _save_variant(sd, d / "fp8.safetensors", **{f"{TO_Q}.weight": fp8})
    if kind == "int8 weight":
        return _save_variant(sd, d / "int8.safetensors", **{f"{TO_Q}.weight": sd[f"{TO_Q}.weight"].to(torch.int8)})
    if kind == "width":
        return _save_variant(sd, d / "width.safetensors", **{f"{TO_Q}.weight": sd[f"{TO_Q}.weight"][:, :100]})
    if kind == "no to_k":
        return _save_variant({k: v for k, v in sd.items() if ".attn.to_k." not in k}, d / "nok.safetensors")
    if kind == "truncated":
        data = files["float"].read_bytes()
        (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
        return d / "truncated.safetensors"
    if kind == "missing":
        return d / "missing.safetensors"
    return files[kind]


WRONG_INPUTS = {
    "unrelated": "not a supported architecture (Qwen-Image, Z-Image, Flux): none of transformer_blocks.N.attn.to_q.weight "
                 "(Qwen-Image), layers.N.attention.qkv.weight (Z-Image), double_blocks.N.img_attn.qkv.weight (Flux) "
                 "(first keys: down_blocks.0.weight)",
    "prefixed": "its keys carry the prefix 'model.diffusion_model.'",
    "no txt_norm": "not a Qwen-Image model: no txt_norm.weight",
    "nunchaku": "a Nunchaku int4 checkpoint, already quantized: convert it with `python -m comfy.quant "
                "convert-nunchaku",
    "int4": "already a quantized checkpoint ('transformer_blocks.0.",
    "fp8 weight": f"tensor '{TO_Q}.weight' is F8_E4M3; quantize needs float linear weights (F16, BF16, F32)",
    "int8 weight": f"tensor '{TO_Q}.weight' is I8",
    "width": f"tensor '{TO_Q}.weight': expected a 2-D linear weight whose in_features is a multiple of 64, "
             "got shape [256, 100]",
    "no to_k": "joint q/k/v quantization needs ['transformer_blocks.0.attn.to_k']",
    "truncated": "cannot read as safetensors",
    "missing": "cannot read as safetensors: no such file",
}


@pytest.mark.parametrize("kind", list(WRONG_INPUTS))
def test_quantize_refuses_inputs_it_cannot_use_before_any_work(files, tmp_path, capsys, monkeypatch, kind):
    src = _wrong_input(kind, files, tmp_path)
    out = tmp_path / "out" / "int4.safetensors"
    out.parent.mkdir()
    with pytest.raises(QuantFileError) as info:  # the library refuses, with the file named
        quantize_file(src, out, progress=False)
    assert info.value.file == str(src) and WRONG_INPUTS[kind] in str(info.value), str(info.value)
    if kind not in ("truncated", "missing"):
        assert isinstance(info.value, QuantizeInputError)
    _no_work(monkeypatch)
    code, err = _run(capsys, "quantize", str(src), str(out))
    assert code == 2 and WRONG_INPUTS[kind] in _one_error_line(err, f"error: {src}: ")
    assert _listing(out.parent) == []


def test_quantize_control_a_float_file_quantizes_and_loads(files, tmp_path, capsys):
    out = tmp_path / "int4.safetensors"
    code = cli.main(["quantize", "--rank", "8", str(files["float"]), str(out)])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    assert not inspect_checkpoint(out).problems
    _loads_and_runs(out)
    assert _listing(tmp_path) == ["int4.safetensors"]


# ---- outputs it must not write ----

@pytest.mark.parametrize("case", ["exists", "directory", "missing folder", "the input"])
@pytest.mark.parametrize("command", ["quantize", "convert-nunchaku"])
def test_outputs_refused_before_any_work(files, tmp_path, capsys, monkeypatch, case, command):
    src = tmp_path / "in.safetensors"
    src.write_bytes(files["float" if command == "quantize" else "nunchaku"].read_bytes())
    out = {"exists": tmp_path / "old.safetensors", "directory": tmp_path / "dir",
           "missing folder": tmp_path / "nowhere" / "out.safetensors", "the input": src}[case]
    if case == "exists":
        out.write_bytes(b"an earlier output")
    if case == "directory":
        out.mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _no_work(monkeypatch)
    monkeypatch.setattr("comfy.quant_tools.convert_nunchaku.streaming_file", lambda *a: pytest.fail("work started"))
    code, err = _run(capsys, command, str(src), str(out))
    expected = {"exists": "output exists; refusing to replace it (--force to overwrite)",
                "directory": "output is a directory", "missing folder": "does not exist",
                "the input": "output is the same file as the input"}[case]
    assert code == 2 and expected in _one_error_line(err, f"error: {out}: ")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))
    with pytest.raises(OutputFileError):  # the library refuses too
        (quantize_file if command == "quantize" else convert_nunchaku_file)(str(src), str(out))


def test_force_overwrites_an_existing_output(files, tmp_path, capsys):
    for command, src in (("quantize", files["float"]), ("convert-nunchaku", files["nunchaku"])):
        out = tmp_path / f"{command}.safetensors"
        out.write_bytes(b"an earlier output")
        assert cli.main([command, str(src), str(out), "--force"]) == 0, capsys.readouterr().err
        assert out.read_bytes() != b"an earlier output"
        _loads_and_runs(out)
    assert _listing(tmp_path) == ["convert-nunchaku.safetensors", "quantize.safetensors"]


# ---- a failure midway leaves nothing behind ----

@pytest.mark.parametrize("error,code,line", [
    (RuntimeError("disk on fire"), 3,
     "error: internal error: RuntimeError: disk on fire (run with -v for the traceback)"),
    (KeyboardInterrupt(), 130, "error: interrupted")], ids=["internal error", "interrupted"])
@pytest.mark.parametrize("existing", [False, True], ids=["new output", "--force over an output"])
def test_failure_midway_leaves_no_output_and_no_partial(files, tmp_path, capsys, monkeypatch, error, code, line,
                                                        existing):
    out = tmp_path / "int4.safetensors"
    if existing:
        out.write_bytes(b"an earlier output")
    real, done = quantizer.quantize_unit, []

    def fail_after_first(*args, **kwargs):
        if done:
            raise error
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantizer, "quantize_unit", fail_after_first)
    got, err = _run(capsys, "quantize", str(files["float"]), str(out), *(["--force"] if existing else []))
    assert got == code and done and _one_error_line(err, "error: ") == line
    assert _listing(tmp_path) == (["int4.safetensors"] if existing else [])
    if existing:
        assert out.read_bytes() == b"an earlier output"


def test_verbose_shows_the_traceback_of_internal_errors(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantizer, "_write", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    code, err = _run(capsys, "quantize", str(files["float"]), str(tmp_path / "out.safetensors"), "-v")
    assert code == 3 and "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1] == "error: internal error: RuntimeError: boom"


# ---- rank, alpha, strength: refused at parsing, one line ----

BAD_NUMBERS = [["quantize", "IN", "OUT", "--rank", "-4"], ["quantize", "IN", "OUT", "--rank", "2.5"],
               ["quantize", "IN", "OUT", "--alpha", "1.5"], ["quantize", "IN", "OUT", "--alpha", "nan"],
               ["quantize", "IN", "OUT", "--alpha", "-0.1"], ["demo", "--strength", "nan"],
               ["demo", "--strength", "inf"], ["demo", "--strength", "1e30"], ["demo", "--strength", "-100.5"],
               ["demo", "--rank", "-1"], ["bench", "--iters", "0"]]


@pytest.mark.parametrize("argv", BAD_NUMBERS, ids=[" ".join((a[0], *a[-2:])) for a in BAD_NUMBERS])
def test_bad_numbers_are_refused_at_parsing(tmp_path, capsys, monkeypatch, argv):
    option = argv[-2]
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, *argv)
    assert code == 2
    assert re.fullmatch(rf"error: argument {option}: expected .*, got '{re.escape(argv[-1])}' \(see .* --help\)",
                        _one_error_line(err, f"error: argument {option}: ")), err
    assert _listing(tmp_path) == []


def test_numbers_in_range_parse():
    parse = cli.build_parser().parse_args
    assert [parse(["demo", "--strength", s]).strength for s in ("100", "-100", "0", "0.25")] == [100, -100, 0, 0.25]
    assert [parse(["quantize", "I", "O", "--alpha", a]).alpha for a in ("0", "1")] == [0, 1]
    assert parse(["quantize", "I", "O", "--rank", "0"]).rank == 0


def test_options_are_checked_for_library_callers_too():
    for bad in (dict(rank=-4), dict(rank=1.5), dict(smooth_alpha=math.nan), dict(smooth_alpha=2.0),
                dict(awq_group_size=0)):
        with pytest.raises(ValueError, match="QuantizeOptions"):
            QuantizeOptions(**bad)


def test_rank_0_quantizes_loads_and_runs(files, tmp_path, capsys):
    """Rank 0 (no low-rank branch) is allowed: the file validates, loads through the stock loader and runs
    on kitchen's path; a LoRA still appends to the (empty) branch and unpatching restores it."""
    out = tmp_path / "r0.safetensors"
    assert cli.main(["quantize", "--rank", "0", str(files["float"]), str(out)]) == 0, capsys.readouterr().err
    assert not inspect_checkpoint(out).problems
    patcher = _loads_and_runs(out)
    layer = patcher.model.diffusion_model.get_submodule(TO_Q)
    assert layer.weight._params.proj_down.shape == (256, 0)


@kernel_env.requires_kernels
def test_rank_0_layer_runs_the_project_kernel_like_kitchen(files, tmp_path):
    out = tmp_path / "r0.safetensors"
    quantize_file(files["float"], out, QuantizeOptions(rank=0), progress=False)
    patcher = comfy.sd.load_diffusion_model(str(out), model_options={"dtype": torch.bfloat16})
    layer = patcher.model.diffusion_model.get_submodule(TO_Q).to(kernel_env.DEVICE)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(kernel_env.DEVICE)
    with torch.no_grad():
        with kernels.forced("kitchen"):
            y_kitchen = layer(x)
        with kernels.forced("triton"):
            assert kernels.w4a4_kernel(x.device).supports(x, layer.weight)  # the kernel, not a fallback
            y_kernel = layer(x)
    assert torch.isfinite(y_kernel).all() and agreement(y_kernel.float(), y_kitchen.float())[0] > 0.9999


# ---- calibration: errors name the calibration file ----

def _calibration(d, kind):
    path = d / "calibration.safetensors"
    widths = {f"{TO_Q}": 256, "transformer_blocks.0.img_mlp.net.2": 1024}
    stats = {k: torch.rand(w) + 0.5 for k, w in widths.items()}
    if kind == "missing":
        return path
    if kind == "wrong width":
        stats[TO_Q] = torch.rand(100)
    if kind == "nan":
        stats[TO_Q][3] = math.nan
    if kind == "another model":
        stats = {"down_blocks.0.attn": torch.rand(8)}
    comfy.utils.save_torch_file(stats, path)
    return path


CALIBRATION_ERRORS = {
    "missing": "cannot read as safetensors: no such file",
    "wrong width": f"calibration entry '{TO_Q}': expected finite float input absmax of shape [256], "
                   "got torch.float32 [100]",
    "nan": f"calibration entry '{TO_Q}'",
    "another model": "calibration names none of the model's 12 W4A4 layers (first entries: down_blocks.0.attn)"}


@pytest.mark.parametrize("kind", list(CALIBRATION_ERRORS))
def test_calibration_errors_name_the_calibration_file(files, tmp_path, capsys, monkeypatch, kind):
    expected = CALIBRATION_ERRORS[kind]
    cal = _calibration(tmp_path, kind)
    _no_work(monkeypatch)
    out = tmp_path / "out.safetensors"
    code, err = _run(capsys, "quantize", str(files["float"]), str(out), "--calibration", str(cal))
    assert code == 2 and expected in _one_error_line(err, f"error: {cal}: ")
    assert "out.safetensors" not in _listing(tmp_path)


def test_calibration_control_a_fitting_file_is_used(files, tmp_path, capsys):
    cal, out = _calibration(tmp_path, "fits"), tmp_path / "out.safetensors"
    code = cli.main(["quantize", str(files["float"]), str(out), "--calibration", str(cal)])
    assert code == 0, capsys.readouterr().err
    smooth = comfy.utils.load_torch_file(out)[f"{TO_Q}.weight_smooth_factor"]
    assert not torch.equal(smooth, torch.ones_like(smooth))  # smoothing used the calibration


# ---- demo: progress as it goes; a second run in the same folder works ----

def test_demo_announces_each_step_and_reruns(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(comfy.quant_tools.demo, "DemoConfig", functools.partial(DemoConfig, num_layers=1, latent_size=8,
                                                                          text_tokens=4))  # the steps, faster
    assert logging.getLogger("comfy.quant_tools.demo").getEffectiveLevel() > logging.INFO  # the CLI must turn INFO on
    for run in range(2):
        caplog.clear()
        assert cli.main(["demo", "--workdir", str(tmp_path)]) == 0, run
        steps = [r.getMessage() for r in caplog.records if r.name == "comfy.quant_tools.demo"]
        words = ("building", "calibrating", "quantizing", "validating", "loading", "running", "LoRA: loading",
                 "LoRA: patching")
        assert len(steps) == len(words) and all(s.startswith(w) for s, w in zip(steps, words)), steps
        captured = capsys.readouterr()
        assert "quantizing: 100%" in captured.err  # the quantizer's bar
        out = captured.out
        assert "cosine nan" not in out and "checks (all passed;" in out and out.count("  [PASS] ") == 3, out
        assert re.search(r"one forward: int4 [\d.]+s, bf16 [\d.]+s", out), out  # both timed in the same run
        names = sorted(p.name for p in tmp_path.iterdir())
        assert all(str(tmp_path / n) in out.splitlines()[-1] for n in names) and len(names) == 3, (names, out)
        umask = os.umask(0)
        os.umask(umask)
        assert {stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in names} == {0o666 & ~umask}
    assert logging.getLogger("comfy.quant").level == logging.NOTSET  # left as it was


def test_demo_verdict_fails_when_a_check_fails(tmp_path, capsys, monkeypatch):
    """Negative control of the verdict: an int4 model that does not agree with bf16 fails its check, exit 1."""
    monkeypatch.setattr(comfy.quant_tools.demo, "DemoConfig", functools.partial(DemoConfig, num_layers=1, latent_size=8,
                                                                                text_tokens=4))
    monkeypatch.setattr(comfy.quant_tools.demo, "agreement", lambda y, ref: (0.5, 3.0))
    assert cli.main(["demo", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "checks (FAILED;" in out and "  [FAIL] int4 agrees with bf16: output cosine 0.50000 (needs >= 0.95)" in out


# ---- lora-check: exit 1 when a patch is refused ----

@pytest.mark.parametrize("variant,code", [("plain", 0), ("dora", 1), ("unmapped key", 1)])
def test_lora_check_exit_status(files, tmp_path, capsys, variant, code):
    g = torch.Generator().manual_seed(0)
    prefix = f"diffusion_model.{TO_Q}"
    lora = {f"{prefix}.lora_up.weight": torch.randn(256, 4, generator=g) * 0.1,
            f"{prefix}.lora_down.weight": torch.randn(4, 256, generator=g) * 0.1}
    if variant == "dora":
        lora[f"{prefix}.dora_scale"] = torch.rand(1, 256, generator=g) + 0.5
    if variant == "unmapped key":
        lora["diffusion_model.no_such_layer.lora_up.weight"] = torch.zeros(4, 4)
    path = tmp_path / "lora.safetensors"
    comfy.utils.save_torch_file(lora, path)
    assert cli.main(["lora-check", str(files["int4"]), str(path)]) == code
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if TO_Q in line)
    assert ("[REJECTED" in row) == (variant == "dora"), out
    assert f"({int(variant == 'dora')} rejected)" in out


# ---- --help: every option documented, with its default ----

def _help_entries(text: str) -> dict[str, str]:
    """{first option string: its help text, whitespace-normalised} from an argparse help page."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = ""
        if current and line.strip():
            entries[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_documents_every_option_with_its_default(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in [(None, parser), *commands.items()]:
        assert cli.main(([name] if name else []) + ["--help"]) == 0
        entries = _help_entries(capsys.readouterr().out)
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)
            if not action.option_strings:
                continue
            text = entries[action.option_strings[0]]
            said = action.default is None or action.default == argparse.SUPPRESS  # -v after a command: its own
            default = "(default:" if said else f"(default: {action.default})"
            assert default in text, (name, action.option_strings, text)


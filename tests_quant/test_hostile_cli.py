"""The last hostile inputs and the command line as a newcomer meets it (issue 18).

Each class: what the user sees (one line naming the file / layer / tensor and exit 2, or a load that works),
with a negative control beside it. Signals are sent to a real subprocess.
"""
from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import comfy.sd
import comfy.utils
import lora_helpers as H
from lora_helpers import no_grad  # noqa: F401 (a fixture)
from factories import cli_model_files
from fuzz_mutations import make_output
from comfy.quant.errors import OutputFileError, QuantFileError, QuantizedLayerError
from comfy.quant_tools import cli, quantizer
from comfy.quant_tools.demo import DemoConfig
from comfy.quant_tools.inspect_file import inspect_checkpoint
from comfy.quant_tools.lora_check import lora_check
from comfy.quant_tools.quantizer import QuantizeOptions, max_useful_rank, w4a4_bytes
from comfy.quant_tools.safetensors_stream import check_output

TINY = DemoConfig(num_layers=1, latent_size=8, text_tokens=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return cli_model_files(tmp_path_factory.mktemp("hostile_cli"), TINY)


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith("error: ")]


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def _no_work(monkeypatch):
    def work(*_args, **_kwargs):
        raise AssertionError("work started")
    monkeypatch.setattr(quantizer, "_write", work)


# ============================================================ int4 files: tensors that were accepted silently
def _variant(files, tmp_path, **changes):
    sd, metadata = comfy.utils.load_torch_file(files["int4"], return_metadata=True)
    sd.update(changes)
    path = tmp_path / "variant.safetensors"
    comfy.utils.save_torch_file(sd, path, metadata=metadata)
    return path, sd


TO_Q = "transformer_blocks.0.attn.to_q"
MOD = "transformer_blocks.0.img_mod.1"


def _stray(sd, kind):
    cq = sd[f"{TO_Q}.comfy_quant"]
    wide = cq.to(torch.int64)
    wide[0] += 256  # '{' + 256: an int64 "byte" that a cast to uint8 would silently turn back into '{'
    return {
        "unknown weight_ suffix (W4A4)": ({f"{TO_Q}.weight_foo": torch.zeros(4)}, QuantizedLayerError, "weight_foo"),
        "unknown weight_ suffix (AWQ)": ({f"{MOD}.weight_extra": torch.zeros(4)}, QuantizedLayerError, "weight_extra"),
        "AWQ weight_zeros on a W4A4 layer": ({f"{TO_Q}.weight_zeros": torch.zeros(4, 256, dtype=torch.bfloat16)},
                                             QuantizedLayerError, "weight_zeros"),
        "int8 float weight": ({"img_in.weight": sd["img_in.weight"].to(torch.int8)}, QuantFileError, "img_in.weight"),
        "comfy_quant int64": ({f"{TO_Q}.comfy_quant": cq.to(torch.int64)}, QuantizedLayerError, "comfy_quant"),
        "comfy_quant int64 > 255": ({f"{TO_Q}.comfy_quant": wide}, QuantizedLayerError, "comfy_quant"),
        "comfy_quant float32": ({f"{TO_Q}.comfy_quant": cq.float()}, QuantizedLayerError, "comfy_quant"),
    }[kind]


STRAY = ["unknown weight_ suffix (W4A4)", "unknown weight_ suffix (AWQ)", "AWQ weight_zeros on a W4A4 layer",
         "int8 float weight", "comfy_quant int64", "comfy_quant int64 > 255", "comfy_quant float32"]


@pytest.mark.parametrize("kind", STRAY)
def test_stray_and_mistyped_tensors_of_an_int4_file_are_refused(files, tmp_path, capsys, kind):
    sd = comfy.utils.load_torch_file(files["int4"])
    changes, error, tensor = _stray(sd, kind)
    path, _ = _variant(files, tmp_path, **changes)
    with pytest.raises(error) as info:
        comfy.sd.load_diffusion_model(str(path))
    assert info.value.file == str(path) and tensor in str(info.value), info.value
    code, err = _run(capsys, "lora-check", path, files["float"])  # a command loading it: one line, exit 2
    assert code == 2 and _error_lines(err) == [f"error: {info.value}"], err


def test_stray_controls_load(files, tmp_path):
    """The clean file loads; a float-only file with an int8 weight keeps the host's behaviour (cast)."""
    comfy.sd.load_diffusion_model(str(files["int4"]))
    sd = dict(files["sd"], **{"img_in.weight": files["sd"]["img_in.weight"].to(torch.int8)})
    path = tmp_path / "float_int8.safetensors"
    comfy.utils.save_torch_file(sd, path)
    patcher = comfy.sd.load_diffusion_model(str(path))
    assert patcher.model.diffusion_model.img_in.weight.is_floating_point()


# ============================================================ quantize: NaN input, rank limit
def test_quantize_nan_weight_is_an_input_error_found_before_any_work(files, tmp_path, capsys, monkeypatch):
    key = "transformer_blocks.0.img_mlp.net.2.weight"
    sd = dict(files["sd"])
    sd[key] = sd[key].clone()
    sd[key][3, 5] = float("nan")
    src = tmp_path / "nan.safetensors"
    comfy.utils.save_torch_file(sd, src)
    _no_work(monkeypatch)
    code, err = _run(capsys, "quantize", src, tmp_path / "out.safetensors")
    assert code == 2, err
    assert _error_lines(err) == [f"error: {src}: tensor '{key}': expected finite values, got 1 NaN (first at index "
                                 "(3, 5)); nothing was written"], err
    assert _listing(tmp_path) == ["nan.safetensors"]


def test_max_useful_rank_is_where_the_layer_stops_being_smaller_than_bf16():
    for n, k in ((256, 256), (256, 1024), (3072, 3072), (12288, 3072), (64, 64)):
        r = max_useful_rank(n, k)
        assert w4a4_bytes(n, k, r) <= 2 * n * k < w4a4_bytes(n, k, r + 1), (n, k, r)
    # by hand for 256x256: codes 32768 + scales 2048 + smooth 512 + 1024 per rank <= 131072 -> rank 93
    assert max_useful_rank(256, 256) == (131072 - 32768 - 2048 - 512) // 1024 == 93


def test_quantize_refuses_a_rank_the_layers_cannot_use(files, tmp_path, capsys, monkeypatch):
    limit = max_useful_rank(256, 256)  # TINY's smallest W4A4 layers are 256x256
    _no_work(monkeypatch)
    code, err = _run(capsys, "quantize", "--rank", "100000", files["float"], tmp_path / "out.safetensors")
    assert code == 2 and len(_error_lines(err)) == 1, err
    assert "rank 100000 is more than layer" in err and f"at most rank {limit}" in err, err
    code, err = _run(capsys, "quantize", "--rank", str(limit + 1), files["float"], tmp_path / "out.safetensors")
    assert code == 2 and f"at most rank {limit}" in err
    assert _listing(tmp_path) == []


def test_rank_at_the_limit_quantizes_and_inspect_passes_it(files, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert _run(capsys, "quantize", "--rank", str(max_useful_rank(256, 256)), files["float"], out)[0] == 0
    report = inspect_checkpoint(out)
    assert not report.problems, report.problems
    assert report.quantized_bytes < report.bf16_equivalent_bytes - report.float_bytes


def test_inspect_flags_a_rank_that_makes_a_layer_larger_than_bf16(files, tmp_path, capsys):
    """A file made elsewhere (here: the library quantizer, which does not check) with rank 128: inspect lists
    each 256x256 layer (limit 93), not the 256x1024 / 1024x256 ones (limit 149); exit 1."""
    q, metadata = quantizer.quantize_state_dict(dict(files["sd"]), QuantizeOptions(rank=128), progress=False)
    path = tmp_path / "big_rank.safetensors"
    comfy.utils.save_torch_file(q, path, metadata=metadata)
    report = inspect_checkpoint(path)
    square = [li.name for li in report.layers if li.rank == 128 and li.out_features == li.in_features == 256]
    assert min(max_useful_rank(256, 1024), max_useful_rank(1024, 256)) > 128 > max_useful_rank(256, 256)
    assert len(report.problems) == len(square) > 0, report.problems
    assert all(f"rank <= {max_useful_rank(256, 256)}" in p and "larger than its bf16 weight" in p
               for p in report.problems), report.problems
    assert _run(capsys, "inspect", path)[0] == 1
    assert not inspect_checkpoint(files["int4"]).problems  # control


# ============================================================ outputs that are not regular files
@pytest.mark.parametrize("kind", ["fifo", "symlink_file", "symlink_dangling"])
@pytest.mark.parametrize("command", ["quantize", "convert-nunchaku"])
def test_non_regular_outputs_are_refused_even_with_force(files, tmp_path, capsys, monkeypatch, kind, command):
    out, _ = make_output(kind, tmp_path, None)
    before = _listing(tmp_path)
    _no_work(monkeypatch)
    src = files["float"] if command == "quantize" else files["nunchaku"]
    code, err = _run(capsys, command, src, out, "--force")
    assert code == 2 and len(_error_lines(err)) == 1, err
    assert _error_lines(err)[0].startswith(f"error: {out}: {command}: output is "), err
    assert ("symbolic link" if "symlink" in kind else "not a regular file") in err
    assert _listing(tmp_path) == before
    assert out.is_fifo() if kind == "fifo" else out.is_symlink()
    if kind == "symlink_file":
        assert (tmp_path / "target.safetensors").read_bytes() == b"target"


def test_a_device_output_is_refused_before_anything_is_opened(files):
    """``/dev/null`` (what ``quantize bf16 /dev/null --force`` replaced as root): refused by the check itself."""
    with pytest.raises(OutputFileError, match="not a regular file"):
        check_output(files["float"], "/dev/null", "quantize", overwrite=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_outputs_are_made_with_the_umask_and_a_new_temporary_name(files, tmp_path, capsys):
    stale = tmp_path / "out.safetensors.partial"  # what an older version left behind: never reused
    stale.write_bytes(b"stale")
    old = os.umask(0o027)
    try:
        assert _run(capsys, "quantize", files["float"], tmp_path / "out.safetensors")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.safetensors").st_mode) == 0o640
    assert stale.read_bytes() == b"stale" and _listing(tmp_path) == ["out.safetensors", "out.safetensors.partial"]


# ============================================================ SIGTERM / SIGHUP during a write (a real process)
CHILD = textwrap.dedent("""
    import sys, time
    from comfy.quant_tools import cli, convert_nunchaku, quantizer

    def slowed(module, name):
        real = getattr(module, name)
        def step(*args, **kwargs):
            out = real(*args, **kwargs)
            print("step", flush=True)  # the parent signals once the output is being written
            time.sleep(0.5)
            return out
        setattr(module, name, step)

    slowed(quantizer, "quantize_unit")
    slowed(convert_nunchaku, "convert_unit")
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("command", ["quantize", "convert-nunchaku"])
@pytest.mark.parametrize("existing", [False, True], ids=["new output", "--force over an output"])
def test_a_signal_midway_leaves_no_output_and_no_partial(files, tmp_path, command, signum, existing):
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(b"an earlier output")
    src = files["float"] if command == "quantize" else files["nunchaku"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    argv = [sys.executable, "-c", CHILD, command, str(src), str(out), *(["--force"] if existing else [])]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert child.stdout.readline() == "step\n", child.stderr.read()
        assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # caught mid-write
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    name = signal.Signals(signum).name
    assert child.returncode == 128 + signum, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: terminated ({name})"], err
    assert _listing(tmp_path) == (["out.safetensors"] if existing else [])
    if existing:
        assert out.read_bytes() == b"an earlier output"


def test_signal_handlers_are_restored_after_a_command(files, tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    _run(capsys, "inspect", files["int4"])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


# ============================================================ messages name commands and files, not functions
def test_convert_nunchaku_refusal_names_the_command(files, tmp_path, capsys):
    code, err = _run(capsys, "convert-nunchaku", files["float"], tmp_path / "o.safetensors")
    assert code == 2 and _error_lines(err)[0].startswith(f"error: {files['float']}: convert-nunchaku: not a "
                                                         "Nunchaku checkpoint"), err
    assert "convert_nunchaku_file" not in err and "_file" not in err.replace(str(files["float"]), "")


# ============================================================ lora-check and demo on LoRAs that are no LoRA
def test_lora_check_on_a_lora_without_tensors_exits_2(files, tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    comfy.utils.save_torch_file({}, empty)
    code, err = _run(capsys, "lora-check", files["int4"], empty)
    assert code == 2 and _error_lines(err) == [f"error: {empty}: holds no tensors: not a LoRA (expected "
                                               "lora_up/lora_down, lora_A/lora_B, LoHa or LoKr tensors)"], err


@pytest.mark.parametrize("kind", ["a model file", "empty", "truncated"])
def test_demo_checks_its_lora_before_any_work(files, tmp_path, capsys, caplog, monkeypatch, kind):
    lora = tmp_path / "lora.safetensors"
    if kind == "a model file":
        lora.write_bytes(files["float"].read_bytes())
    elif kind == "empty":
        comfy.utils.save_torch_file({}, lora)
    else:
        lora.write_bytes(files["float"].read_bytes()[:1000])
    monkeypatch.setattr("comfy.quant_tools.demo._quantize",
                        lambda *a: (_ for _ in ()).throw(AssertionError("work started")))
    with caplog.at_level(logging.WARNING):
        code, err = _run(capsys, "demo", "--workdir", tmp_path / "work", "--lora", lora)
    assert code == 2 and len(_error_lines(err)) == 1 and _error_lines(err)[0].startswith(f"error: {lora}: "), err
    assert {"a model file": "none of its", "empty": "holds no tensors",
            "truncated": "cannot read as safetensors"}[kind] in err
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]


def test_demo_workdir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    code, err = _run(capsys, "demo", "--workdir", path)
    assert code == 2 and _error_lines(err) == [f"error: {path}: demo: --workdir is a file; give a folder (it is "
                                               "made when missing)"], err


# ============================================================ LoRA alpha x strength bound
@pytest.mark.usefixtures("no_grad")
@pytest.mark.parametrize("target", ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.img_mod.1"],
                         ids=["svdquant", "awq"])
def test_huge_alpha_on_an_int4_target_is_refused_and_the_output_stays_finite(target, caplog):
    mp = H.load_model(torch.float32)
    lora, _ = H.lora_for(mp, [target], seed=3, alpha=1e30)
    with caplog.at_level(logging.WARNING):
        patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert not patcher.patches
    assert any("per unit of input" in r.getMessage() and target in r.getMessage() for r in caplog.records)
    rows, _ = lora_check(mp, lora)
    assert rows[0][2].startswith("REJECTED: the delta can move an output by")


@pytest.mark.usefixtures("no_grad")
def test_the_alpha_bound_counts_strength_and_in_features():
    """Just under the bound applies, just over is refused: the bound is |up|·|down|·rank·alpha/rank·strength·K."""
    from comfy.quant.patching import _ACTIVATION_MAX, adapter_problem
    from comfy.weight_adapter.lora import LoRAAdapter

    up, down = torch.full((8, 2), 0.5), torch.full((2, 16), 0.25)
    per_alpha = 0.5 * 0.25 * 2 / 2 * 16  # |up| |down| rank (alpha / rank) K, for alpha 1
    for strength in (1.0, -100.0):
        edge = _ACTIVATION_MAX / per_alpha / abs(strength)
        ok = LoRAAdapter(set(), (up, down, edge * 0.99, None, None, None))
        bad = LoRAAdapter(set(), (up, down, edge * 1.01, None, None, None))
        assert adapter_problem(ok, strength) is None
        assert "per unit of input" in adapter_problem(bad, strength)


def test_the_float_target_is_reported_by_lora_check(files):
    mp = H.load_model(torch.float32)
    lora, _ = H.lora_for(mp, ["img_in"], seed=3, alpha=1e30)
    rows, _ = lora_check(mp, lora)
    assert rows and rows[0][2].startswith("REJECTED: the delta can move an output by"), rows


# ============================================================ the LoRA-output-term warning: on saving only
@pytest.mark.usefixtures("no_grad")
def test_output_term_warning_only_when_saving(tmp_path, caplog):
    mp = H.load_model(torch.float32)
    lora, _ = H.lora_for(mp, [MOD], seed=5)  # AWQ: the LoRA is an output term the layout cannot store
    patcher, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    patcher.patch_model()
    try:
        with caplog.at_level(logging.WARNING):
            sd = mp.model.diffusion_model.state_dict()  # what a LoRA key map does: no warning
            assert not [r for r in caplog.records if "output term" in r.getMessage()]
            comfy.utils.save_torch_file(sd, tmp_path / "saved.safetensors")
        said = [r.getMessage() for r in caplog.records if "output term" in r.getMessage()]
        assert len(said) == 1 and MOD in said[0] and "unpatch before saving" in said[0], said
    finally:
        patcher.unpatch_model()
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # control: unpatched, nothing to say
        comfy.utils.save_torch_file(mp.model.diffusion_model.state_dict(), tmp_path / "clean.safetensors")
    assert not [r for r in caplog.records if "output term" in r.getMessage()]


def test_inspect_takes_v_after_the_file(files, capsys):
    """``inspect FILE -v`` was refused as an unrecognised argument."""
    assert cli.main(["inspect", str(files["int4"]), "-v"]) == 0
    assert cli.main(["-v", "inspect", str(files["int4"])]) == 0
    assert "problems: 0" in capsys.readouterr().out

"""A user's mistakes meet one line on stderr and a non-zero exit, not a traceback (``-v`` shows it);
every input error is a ``QuantFileError`` naming the file, raised with its own type by the loaders."""
import pytest
import torch

import comfy.sd
import comfy.utils
from comfy.quant import cli
from comfy.quant.demo import DemoConfig, synthetic_state_dict
from comfy.quant.errors import QuantFileError, QuantizedLayerError, UnreadableFileError
from comfy.quant.nunchaku import NunchakuConversionError
from comfy.quant.quantizer import QuantizeOptions, quantize_file

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


def test_cli_verbose_shows_the_traceback(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"garbage")
    with pytest.raises(UnreadableFileError):
        cli.main(["-v", "lora-check", str(model), str(model)])

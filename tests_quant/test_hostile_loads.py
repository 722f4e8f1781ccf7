"""All-or-nothing loads: an int4 model is returned only if every tensor of it came from the file; a file
whose metadata does not parse, is out of bounds or disagrees with its tensors is refused before a model
is built. Each case edits the tiny int4 checkpoint of ``lora_helpers`` and loads it from disk through
``comfy.sd.load_diffusion_model``; the untouched checkpoint loading is the negative control."""
import hashlib
import json

import pytest
import torch

import comfy.sd
import comfy.utils
from comfy.quant_tools.demo import DemoConfig, synthetic_state_dict
from comfy.quant.errors import IncompleteModelError, MetadataError, QuantFileError, QuantizedLayerError
from comfy.quant.formats import encode_config
from lora_helpers import checkpoint

LAYER = "transformer_blocks.0.attn.to_q"


def _write(tmp_path, sd, meta):
    path = tmp_path / "model.safetensors"
    comfy.utils.save_torch_file(sd, path, metadata=meta)
    return path


def _load_edited(tmp_path, edit):
    """Load the checkpoint after ``edit(sd, meta)``; the file must be byte-identical afterwards."""
    sd, meta = checkpoint()
    edit(sd, meta)
    path = _write(tmp_path, sd, meta)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        return comfy.sd.load_diffusion_model(path)
    finally:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # no input file is ever overwritten


def _header(meta):
    return json.loads(meta["_quantization_metadata"])


def test_the_unedited_checkpoint_loads_whole(tmp_path):
    patcher = _load_edited(tmp_path, lambda sd, meta: None)
    assert patcher.model.diffusion_model.transformer_blocks[0].attn.to_q.bias.isfinite().all()


@pytest.mark.parametrize("key", [f"{LAYER}.bias", "transformer_blocks.1.attn.norm_q.weight", "norm_out.linear.bias",
                                 "transformer_blocks.0.img_mod.1.bias"])
def test_a_missing_tensor_refuses_the_model(tmp_path, key):
    with pytest.raises(IncompleteModelError) as info:
        _load_edited(tmp_path, lambda sd, meta: sd.pop(key))
    assert info.value.missing == [key] and str(info.value).startswith(str(tmp_path))
    assert "nothing was loaded" in str(info.value)


def test_a_tensor_of_a_module_the_model_lacks_refuses_the_model(tmp_path):
    stray = "transformer_blocks.0.attn.to_z.weight"
    with pytest.raises(IncompleteModelError) as info:
        _load_edited(tmp_path, lambda sd, meta: sd.__setitem__(stray, torch.zeros(4, 4)))
    assert info.value.unexpected == [stray]


def test_a_stray_block_is_named(tmp_path):
    with pytest.raises(QuantFileError, match=r"transformer_blocks numbered \[0, 1, 9\].*block 2 is missing"):
        _load_edited(tmp_path, lambda sd, meta: sd.__setitem__("transformer_blocks.9.attn.norm_q.weight",
                                                                torch.ones(64)))


def _drop_quant_metadata(sd, meta):
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        del sd[key]
    del meta["_quantization_metadata"]


def test_int4_tensors_without_quantization_metadata(tmp_path):
    with pytest.raises(QuantizedLayerError, match="quantization metadata for this layer") as info:
        _load_edited(tmp_path, _drop_quant_metadata)
    assert info.value.tensor in ("weight_proj_down", "weight_proj_up", "weight_smooth_factor", "weight_zeros")


@pytest.mark.parametrize("header, expected", [
    ("[]", "a JSON object"),
    ('{"layers": []}', "'layers' object"),
    ('{"layers": {"x": 3}}', 'a "format" string'),
    ("[" * 5000 + "]" * 5000, "nested at most"),
    ("{" * 3, "valid JSON"),
])
def test_an_unusable_quantization_header(tmp_path, header, expected):
    with pytest.raises(MetadataError, match=expected) as info:
        _load_edited(tmp_path, lambda sd, meta: meta.__setitem__("_quantization_metadata", header))
    assert info.value.tensor == "_quantization_metadata"


def test_per_layer_json_and_header_disagree(tmp_path):
    def edit(sd, meta):
        sd[f"{LAYER}.comfy_quant"] = encode_config({**_header(meta)["layers"][LAYER], "act_unsigned": True})
    with pytest.raises(MetadataError, match="the same JSON as its _quantization_metadata entry") as info:
        _load_edited(tmp_path, edit)
    assert info.value.layer == LAYER


@pytest.mark.parametrize("config, expected", [
    ("[]", "a JSON object"),
    ('{"axes_dims_rope": "abc"}', "three positive even integers"),
    ('{"axes_dims_rope": [8, 28, 30]}', "summing to the head dim 64"),
    ('{"axes_dims_rope": [8, 28, 28.0]}', "three positive even integers"),
    ('{"num_attention_heads": "four"}', "num_attention_heads = 4"),
    ('{"attention_head_dim": 128}', "attention_head_dim = 64"),
    ("not json", "valid JSON"),
])
def test_an_unusable_or_disagreeing_config(tmp_path, config, expected):
    with pytest.raises(MetadataError, match=expected) as info:
        _load_edited(tmp_path, lambda sd, meta: meta.__setitem__("config", config))
    assert info.value.tensor == "config" and str(info.value).startswith(str(tmp_path))


def test_a_config_that_agrees_is_used(tmp_path):
    config = json.dumps({"num_attention_heads": 4, "attention_head_dim": 64, "axes_dims_rope": [16, 24, 24]})
    patcher = _load_edited(tmp_path, lambda sd, meta: meta.__setitem__("config", config))
    assert tuple(patcher.model.model_config.unet_config["axes_dims_rope"]) == (16, 24, 24)


def test_a_float_model_missing_a_bias_keeps_the_hosts_lenient_warning(caplog):
    """Float-only files keep ComfyUI's behaviour (warn and load); only int4 models load all-or-nothing."""
    sd = synthetic_state_dict(DemoConfig(num_layers=1))
    del sd["transformer_blocks.0.attn.to_q.bias"]
    with caplog.at_level("WARNING"):
        comfy.sd.load_diffusion_model_state_dict(sd)
    assert "transformer_blocks.0.attn.to_q.bias" in caplog.text and "unet missing" in caplog.text


@pytest.mark.parametrize("key, tensor, expected", [
    ("transformer_blocks.1.attn.norm_k.weight", torch.ones(32), r"expected shape \(64,\), got \(32,\)"),
    ("norm_out.linear.weight", torch.ones(7, 3), r"expected shape"),
    ("transformer_blocks.0.attn.norm_q.weight", torch.ones(64, dtype=torch.int8), "expected a float dtype"),
    ("img_in.weight", None, r"expected finite values, got 1 Inf \(first at index \(0, 5\)\)"),
])
def test_a_float_tensor_of_an_int4_model_is_checked_before_it_is_copied(tmp_path, key, tensor, expected):
    """Not torch's "Error(s) in loading state_dict" halfway through, nor an int tensor copied into a float one."""
    def edit(sd, meta):
        if tensor is None:
            sd[key].view(-1)[5] = float("inf")
        else:
            sd[key] = tensor
    with pytest.raises(QuantFileError, match=expected) as info:
        _load_edited(tmp_path, edit)
    assert key in (info.value.tensor, f"{info.value.layer}.{info.value.tensor}")  # linears name layer + tensor


@pytest.mark.parametrize("key, tensor, expected", [
    ("img_in.weight", torch.ones(1, 256, 64), r"img_in.weight': expected 2 dimension\(s\)"),  # found by the fuzzer
    ("transformer_blocks.0.attn.norm_q.weight", torch.ones(0), "not a multiple of the head dim 0"),
    ("txt_norm.weight", torch.ones(2, 64), r"txt_norm.weight': expected 1 dimension\(s\)"),
])
def test_detection_tensors_of_the_wrong_rank(tmp_path, key, tensor, expected):
    """The tensors detection measures must have the rank it reads (not a ValueError / ZeroDivisionError)."""
    with pytest.raises(QuantFileError, match=expected):
        _load_edited(tmp_path, lambda sd, meta: sd.__setitem__(key, tensor))

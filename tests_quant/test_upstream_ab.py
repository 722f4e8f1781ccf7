"""A/B: for everything that is not int4, the patched ComfyUI behaves exactly like upstream.

The same scenario (``upstream_ab_scenarios.py``) runs in an UNPATCHED and a PATCHED copy of each upstream
tree (``upstream_env``: both pinned trees, each with its own comfy-kitchen / comfy-aimdo), on the same files
made here; the two records must be identical: every case's outcome (or exception type and message), every
log line of level INFO and above (the copy's own path written as ``<ComfyUI>``), the detected model and
``unet_config``, every state-dict tensor (SHA-256 of its bytes: bit-identical, NaNs included) and every
forward output (bit-identical). Nothing is compared with a tolerance: the patch must not change a single
bit of what a user without int4 gets.

Files (ComfyUI key names): a tiny Flux.1 (``arch_fixtures``: hidden 256 = 2 heads x 128, which upstream's
detection reads from the shapes) in bf16, as FP8 (``float8_e4m3fn`` per-layer ``comfy_quant``, as upstream's
``tests-unit/comfy_quant`` makes them, and the same in a ``_quantization_metadata`` header), int8
(``int8_tensorwise``) and nvfp4 metadata; malformed ones (a float tensor of the wrong shape in an FP8 file,
a header layer without a format, a header that is not JSON, a truncated file, garbage bytes); a tiny float
Qwen-Image (``demo.py``'s model, 2 heads x 128, which upstream's detection cannot size: it reads only
``in_channels`` and the block count); float LoRAs on the Flux model (two good ones, and a NaN factor, a
non-scalar alpha, mismatched ranks, a wrong output width, strength 150, keys that match nothing).

Negative control: the same comparison between the float Flux file and a copy with ONE weight element
moved by one bf16 ulp reports exactly that tensor and a different forward output.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import upstream_env as U
from upstream_env import comfyui, comfyui_unpatched, upstream_source  # noqa: F401 (fixtures)

SCRIPT = U.TESTS_DIR / "upstream_ab_scenarios.py"
FLUX_FP8_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "double_blocks.1.txt_attn.proj",
                   "single_blocks.0.linear1", "single_blocks.1.linear2")
PERTURBED = "final_layer.linear.weight"  # feeds the output directly: one ulp shows there

# tag -> file name, in the order the scenario loads them ("flux" first: the LoRAs and the import check use it)
MODELS = {
    "flux": "flux-bf16.safetensors",
    "flux_perturbed": "flux-bf16-one-ulp.safetensors",
    "fp8": "flux-fp8-comfy-quant.safetensors",
    "fp8_header": "flux-fp8-header.safetensors",
    "int8": "flux-int8-tensorwise.safetensors",
    "nvfp4": "flux-nvfp4.safetensors",
    "fp8_bad_shape": "flux-fp8-wrong-bias-shape.safetensors",
    "header_no_format": "flux-fp8-header-no-format.safetensors",
    "header_not_json": "flux-fp8-header-not-json.safetensors",
    "truncated": "flux-truncated.safetensors",
    "garbage": "flux-garbage.safetensors",
    "qwen_image": "qwen-image-tiny-bf16.safetensors",
}
FORWARD = {tag: "flux" for tag in ("flux", "flux_perturbed", "fp8", "fp8_header", "int8", "nvfp4")}
LORA_TARGETS = ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear1",
                "single_blocks.1.linear2", "final_layer.linear")
# tag -> (file, strength)
LORAS = {
    "good": ("lora-good.safetensors", 0.8),
    "good_kohya_negative": ("lora_good_kohya.safetensors", -1.3),
    "nan_factor": ("lora-nan-factor.safetensors", 1.0),
    "nonscalar_alpha": ("lora-nonscalar-alpha.safetensors", 1.0),
    "rank_mismatch": ("lora-rank-mismatch.safetensors", 1.0),
    "wrong_out_width": ("lora-wrong-out-width.safetensors", 1.0),
    "strength_150": ("lora-good.safetensors", 150.0),
    "unmatched_keys": ("lora-unmatched-keys.safetensors", 1.0),
}


# ------------------------------------------------------------------------------------ files
def _fp8(w: torch.Tensor):
    """(float8_e4m3fn weight, fp32 scalar scale) with w ≈ weight * scale."""
    scale = w.float().abs().amax().clamp(min=1e-12) / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def _int8(w: torch.Tensor):
    scale = w.float().abs().amax().clamp(min=1e-12) / 127.0
    return torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8), scale.reshape(())


def _nvfp4(w: torch.Tensor):
    """nvfp4-shaped tensors: packed codes (N, K/2), fp8 block scales (N, K/16), fp32 global scale."""
    n, k = w.shape
    g = torch.Generator().manual_seed(n * 7 + k)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    block = (w.float().reshape(n, k // 16, 16).abs().amax(-1) / 6.0).clamp(min=1e-3)
    return codes, block.to(torch.float8_e4m3fn), torch.tensor(1.0)


def _conf_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def quantized_flux(sd: dict, fmt: str, layers=FLUX_FP8_LAYERS, header=False):
    """``sd`` with ``layers`` stored as ``fmt``: (state dict, metadata) with per-layer ``comfy_quant`` tensors,
    or with the ``_quantization_metadata`` header when ``header``."""
    sd, confs = dict(sd), {}
    for layer in layers:
        w = sd.pop(f"{layer}.weight")
        if fmt == "float8_e4m3fn":
            sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = _fp8(w)
        elif fmt == "int8_tensorwise":
            sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = _int8(w)
        else:
            sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"], sd[f"{layer}.weight_scale_2"] = _nvfp4(w)
        confs[layer] = {"format": fmt}
    if header:
        return sd, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": confs})}
    sd.update({f"{layer}.comfy_quant": _conf_tensor(c) for layer, c in confs.items()})
    return sd, None


def _lora_factors(n, k, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g) * 0.1).to(torch.bfloat16), \
        (torch.randn(rank, k, generator=g) / k ** 0.5).to(torch.bfloat16)


def lora_state_dict(shapes: dict, kohya=False, rank=4, alpha=2.0, seed=0) -> dict:
    """A LoRA on ``shapes`` (layer -> (N, K)): ``diffusion_model.<layer>.lora_up/down.weight`` + ``.alpha``,
    or kohya's ``lora_unet_<layer_with_underscores>``."""
    sd = {}
    for i, (layer, (n, k)) in enumerate(sorted(shapes.items())):
        base = "lora_unet_" + layer.replace(".", "_") if kohya else f"diffusion_model.{layer}"
        sd[f"{base}.lora_up.weight"], sd[f"{base}.lora_down.weight"] = _lora_factors(n, k, rank, seed + 31 * i)
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def _save(sd, path: Path, metadata=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


def _one_ulp(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its first element moved to the next bf16 value."""
    bits = t.clone().view(torch.int16)
    bits.view(-1)[0] += 1
    return bits.view(torch.bfloat16)


def _model_files(d: Path, flux: dict, qwen: dict) -> None:
    _save(flux, d / MODELS["flux"])
    _save({**flux, PERTURBED: _one_ulp(flux[PERTURBED])}, d / MODELS["flux_perturbed"])
    for tag, fmt, header in (("fp8", "float8_e4m3fn", False), ("fp8_header", "float8_e4m3fn", True),
                             ("int8", "int8_tensorwise", False), ("nvfp4", "nvfp4", False)):
        layers = FLUX_FP8_LAYERS[:2] if fmt == "nvfp4" else FLUX_FP8_LAYERS
        sd, meta = quantized_flux(flux, fmt, layers, header)
        _save(sd, d / MODELS[tag], meta)
    sd, _ = quantized_flux(flux, "float8_e4m3fn")
    sd["final_layer.linear.bias"] = torch.zeros(5, dtype=torch.bfloat16)  # the model has 64
    _save(sd, d / MODELS["fp8_bad_shape"])
    sd, meta = quantized_flux(flux, "float8_e4m3fn", header=True)
    _save(sd, d / MODELS["header_no_format"], {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {layer: {"params": {}} for layer in FLUX_FP8_LAYERS}})})
    _save(sd, d / MODELS["header_not_json"], {"_quantization_metadata": '{"layers": {'})
    data = (d / MODELS["flux"]).read_bytes()
    (d / MODELS["truncated"]).write_bytes(data[: len(data) // 2])
    (d / MODELS["garbage"]).write_bytes(bytes(range(256)) * 64)
    _save(qwen, d / MODELS["qwen_image"])


def _lora_files(d: Path, flux: dict) -> None:
    shapes = {layer: tuple(flux[f"{layer}.weight"].shape) for layer in LORA_TARGETS}
    good = lora_state_dict(shapes, seed=1)
    _save(good, d / LORAS["good"][0])
    _save(lora_state_dict(shapes, kohya=True, rank=8, alpha=8.0, seed=2), d / LORAS["good_kohya_negative"][0])
    up = "diffusion_model.single_blocks.0.linear1.lora_up.weight"
    down = "diffusion_model.single_blocks.0.linear1.lora_down.weight"
    nan = dict(good)
    nan[up] = nan[up].clone()
    nan[up][3, 1] = float("nan")
    _save(nan, d / LORAS["nan_factor"][0])
    _save({**good, "diffusion_model.final_layer.linear.alpha": torch.tensor([2.0, 3.0])},
          d / LORAS["nonscalar_alpha"][0])
    n, k = shapes["single_blocks.0.linear1"]
    _save({**good, down: _lora_factors(8, k, 8, 5)[1]}, d / LORAS["rank_mismatch"][0])   # up is (N, 4)
    _save({**good, up: _lora_factors(n + 1, k, 4, 6)[0]}, d / LORAS["wrong_out_width"][0])
    _save({**good, "diffusion_model.no_such_block.lora_up.weight": torch.ones(4, 4, dtype=torch.bfloat16),
           "diffusion_model.no_such_block.lora_down.weight": torch.ones(4, 4, dtype=torch.bfloat16)},
          d / LORAS["unmatched_keys"][0])


def _inputs(path: Path, qwen_cfg) -> None:
    from comfy.quant_tools.demo import demo_inputs
    g = torch.Generator().manual_seed(7)
    x, t, ctx = demo_inputs(qwen_cfg, seed=3)
    _save({"flux.x": torch.randn(1, 16, 8, 8, generator=g), "flux.t": torch.tensor([0.6]),
           "flux.context": torch.randn(1, 8, 128, generator=g), "flux.y": torch.randn(1, 64, generator=g),
           "flux.guidance": torch.tensor([3.5]), "qwen.x": x, "qwen.t": t, "qwen.context": ctx}, path)


@dataclass
class Files:
    dir: Path
    inputs: Path
    qwen_kwargs: dict


@pytest.fixture(scope="session")
def ab_files(tmp_path_factory) -> Files:
    import arch_fixtures as A
    from comfy.quant_tools.demo import model_kwargs, synthetic_state_dict
    d = tmp_path_factory.mktemp("ab-models")
    (d / "diffusion_models").mkdir()
    (d / "loras").mkdir()
    cfg = U.int4_config()
    flux = A.comfy_float_state_dict("flux", seed=0)
    _model_files(d / "diffusion_models", flux, synthetic_state_dict(cfg))
    _lora_files(d / "loras", flux)
    _inputs(d / "inputs.safetensors", cfg)
    return Files(d, d / "inputs.safetensors", model_kwargs(cfg))


# ------------------------------------------------------------------------------------ runs
@dataclass
class Side:
    result: dict
    tensors: dict
    root: str       # the copy's path, written as <ComfyUI> in what is compared

    def case(self, name) -> dict:
        return self.result["cases"].get(name, {"outcome": "not run"})


@dataclass
class AB:
    rev: str
    pins: dict      # the tree's comfy-kitchen / comfy-aimdo pins ({} with $COMFYUI_PATH: this Python's own)
    site: Path | None
    unpatched: Side
    patched: Side


def _run(copy, workdir: Path, files: Files) -> Side:
    r = U.run_script(SCRIPT, copy.path, "ab", workdir, models_dir=files.dir, inputs=files.inputs, models=MODELS,
                     forward=FORWARD, lora_model="flux", loras=LORAS, qwen_file=MODELS["qwen_image"],
                     qwen_kwargs=files.qwen_kwargs)
    return Side(r, U.scenario_tensors(r), str(copy.path))


@pytest.fixture(scope="session")
def ab(comfyui, comfyui_unpatched, ab_files, tmp_path_factory) -> AB:
    work = tmp_path_factory.mktemp(f"ab-{comfyui.rev}")
    return AB(comfyui.rev, comfyui.pins, comfyui.site, _run(comfyui_unpatched, work / "unpatched", ab_files),
              _run(comfyui, work / "patched", ab_files))


# ------------------------------------------------------------------------------------ comparison
INT4_FORMATS = {"svdquant_w4a4", "awq_w4a16"}
NATIVE_OPS = re.compile(r"^(INFO root: )Native ops: (.*?) (?:, emulated ops: (.*))?$")


def _ops_line(line: str) -> str:
    """``mixed_precision_ops``' "Native ops: ..., emulated ops: ..." line, whose names come from a set (their
    order changes from one run to the next), sorted; minus the two int4 formats, the one thing the patch
    adds to it (it registers them in ``QUANT_ALGOS``)."""
    m = NATIVE_OPS.match(line)
    if not m:
        return line
    native, emulated = (sorted({x.strip() for x in (g or "").split(",") if x.strip()} - INT4_FORMATS)
                        for g in m.group(2, 3))
    return f"{m.group(1)}Native ops (sorted, int4 formats left out): {native}; emulated ops: {emulated}"


def _normalized(value: dict, root: str) -> dict:
    text = json.dumps(value, sort_keys=True, default=str)
    value = json.loads(text.replace(root, "<ComfyUI>") if root else text)
    if "logs" in value:
        value["logs"] = [_ops_line(line) for line in value["logs"]]
    return value


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def differences(a: dict, b: dict, a_root="", b_root="", a_tensors=None, b_tensors=None, tensor_key=None) -> list:
    """What differs between two recorded cases: one line per field (tensors: the keys that differ)."""
    a, b = _normalized(a, a_root), _normalized(b, b_root)
    a.pop("traceback", None), b.pop("traceback", None)
    out = []
    for field in sorted(set(a) | set(b)):
        va, vb = a.get(field), b.get(field)
        if field == "state" and isinstance(va, dict) and isinstance(vb, dict):
            keys = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
            if keys:
                out.append(f"state: {len(keys)} tensors differ: {keys[:8]}")
        elif field == "logs" and va != vb:
            out.append("logs: only unpatched " + repr([x for x in va or [] if x not in (vb or [])])[:1500]
                       + "; only patched " + repr([x for x in vb or [] if x not in (va or [])])[:1500])
        elif va != vb:
            out.append(f"{field}: unpatched {str(va)[:700]!r} / patched {str(vb)[:700]!r}")
    if tensor_key is not None:
        ta, tb = (a_tensors or {}).get(tensor_key), (b_tensors or {}).get(tensor_key)
        if (ta is None) != (tb is None) or (ta is not None and not _bit_equal(ta, tb)):
            out.append(f"tensor {tensor_key}: not bit-identical")
    return out


def _assert_same(ab: AB, case: str, tensor_key=None):
    a, b = ab.unpatched.case(case), ab.patched.case(case)
    diff = differences(a, b, ab.unpatched.root, ab.patched.root, ab.unpatched.tensors, ab.patched.tensors,
                       tensor_key)
    print(f"[ab {ab.rev} {case}] unpatched {_outcome_line(a)}; patched {_outcome_line(b)}; "
          f"{len(a.get('logs', []))} log lines")
    assert not diff, f"{case} differs between unpatched and patched upstream {ab.rev}:\n" + "\n".join(diff)


def _outcome_line(case: dict) -> str:
    o = case.get("outcome")
    return o if isinstance(o, str) else f"{o['type']}: {o['message'][:150]}"


# ------------------------------------------------------------------------------------ tests
def test_ab_both_ran_in_the_right_copies(ab):
    """The scenario ran to its end on both sides, on CPU, with the tree's own pinned comfy-kitchen and
    comfy-aimdo (imported from its pinned folder), and the patched copy is the one with comfy/quant."""
    for side, has in ((ab.unpatched, False), (ab.patched, True)):
        start = side.case("startup")
        assert start["outcome"] == "ok", start
        assert start["device"] == "cpu" and start["has_comfy_quant"] is has
        print(f"[ab {ab.rev}] packages {start['packages']}")
        for name, version in ab.pins.items():
            assert start["packages"][name] == [version, str(ab.site)], (name, start["packages"][name])
        assert side.case("load:flux")["outcome"] == "ok", side.case("load:flux")
        assert "qwen_forward" in side.result["cases"]


def test_ab_startup_logs_the_same(ab):
    """Importing nodes / comfy.sd logs the same lines (sorted: comfy-kitchen reports its backends in set
    order, which changes from run to run)."""
    a, b = (sorted(side.case("startup")["logs"]) for side in (ab.unpatched, ab.patched))
    assert a == b, f"only unpatched {[x for x in a if x not in b]}; only patched {[x for x in b if x not in a]}"


@pytest.mark.parametrize("tag", list(MODELS))
def test_ab_model_file_loads_the_same(ab, tag):
    """UNETLoader on each file: same outcome or error, same log lines, same detected model and unet_config,
    bit-identical state dict; then, where the file loaded, a bit-identical forward output."""
    _assert_same(ab, f"load:{tag}")
    if tag in FORWARD and ab.unpatched.case(f"load:{tag}")["outcome"] == "ok":
        _assert_same(ab, f"forward:{tag}", tensor_key=f"forward:{tag}")


@pytest.mark.parametrize("tag", list(LORAS))
def test_ab_float_lora_applies_the_same(ab, tag):
    """LoraLoaderModelOnly on the float Flux model: same outcome or error, same log lines, bit-identical
    patched weights, and the same tensors restored after unloading. (The good LoRAs change exactly their
    target weights in unpatched upstream, and unloading restores them: the comparison sees applied patches.)"""
    _assert_same(ab, f"lora:{tag}")
    if tag.startswith("good"):
        base, case = ab.unpatched.case("load:flux")["state"], ab.unpatched.case(f"lora:{tag}")
        assert sorted(k for k, v in case["state"].items() if base[k] != v) == sorted(f"{t}.weight"
                                                                                      for t in LORA_TARGETS)
        assert case["not_restored"] == []


def test_ab_qwen_image_forward_bit_identical(ab):
    """Upstream's own QwenImageTransformer2DModel at the tiny file's widths (float weights): the patched
    attention (grouped q/k/v) gives bit-identical output."""
    _assert_same(ab, "qwen_forward", tensor_key="qwen_forward")
    assert ab.unpatched.case("qwen_forward")["outcome"] == "ok"


def test_ab_start_and_float_load_import_no_kernels(ab):
    """After importing nodes / comfy.sd, loading the float model and running it, the patched ComfyUI has
    imported no comfy.quant.kernels.* module and no Triton module that unpatched upstream does not import
    itself (upstream's comfy-kitchen imports Triton to probe its backend where Triton is installed)."""
    mods, plain = ab.patched.result["modules"], ab.unpatched.result["modules"]
    print(f"[ab {ab.rev}] patched imports {len(mods['comfy_quant'])} comfy.quant modules; Triton modules: "
          f"{len(plain['triton'])} unpatched, {len(mods['triton'])} patched")
    assert mods["kernels"] == [], mods["kernels"]
    assert sorted(set(mods["triton"]) - set(plain["triton"])) == []
    assert plain["comfy_quant"] == [] and "comfy.quant.host" in mods["comfy_quant"]


def test_ab_negative_control_detects_one_ulp(ab):
    """The comparison itself: the float file against the same file with one weight element one bf16 ulp off,
    in the same (unpatched) run, differs in exactly that tensor and in the forward output; and a run
    compared with itself has no difference."""
    side = ab.unpatched
    diff = differences(side.case("load:flux"), side.case("load:flux_perturbed"))
    assert diff == [f"state: 1 tensors differ: {[PERTURBED]}"], diff
    t = side.tensors
    assert not _bit_equal(t["forward:flux"], t["forward:flux_perturbed"])
    fwd = differences(side.case("forward:flux"), side.case("forward:flux_perturbed"))
    assert any(line.startswith("digest:") for line in fwd), fwd
    for case in side.result["cases"]:
        assert differences(side.case(case), side.case(case)) == []

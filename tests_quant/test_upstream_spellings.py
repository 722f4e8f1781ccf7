"""Integration: files in ComfyUI PR #13580's key spellings, and files whose tensors carry
``model.diffusion_model.`` under an unprefixed ``_quantization_metadata``, through the real upstream
``UNETLoader`` of a patched copy (``upstream_env``'s ``comfyui`` fixture, the existing ``load`` scenario).

Both files are made from the int4 file of the ``models`` fixture by renaming or prefixing keys, so that file
is the control: every int4 layer's output must be bit-identical to it (same tensors, same code path in the
same upstream) and within ``kernel_tolerance(Σ|terms|, dtype, k)`` of the float64 reference computed from
the stored tensors (``upstream_env.int4_reference``), as ``test_upstream_comfyui.py`` asks of the int4 file.
"""
from __future__ import annotations

import json

import torch

import upstream_env as U
from test_key_spellings import pr13580, prefixed
from upstream_env import comfyui, models, upstream_source  # noqa: F401 (fixtures)

TAGS = ("native", "pr13580", "prefixed")


def _write_models(models, root):
    import comfy.utils
    sd, meta = comfy.utils.load_torch_file(str(models.path(models.int4_name)), return_metadata=True)
    folder = root / "diffusion_models"
    folder.mkdir(parents=True)
    variants = {"native": (sd, meta), "pr13580": pr13580(sd, meta, per_layer_json=False),
                "prefixed": prefixed(sd, meta)}
    for tag, (tensors, metadata) in variants.items():
        comfy.utils.save_torch_file(tensors, folder / f"{tag}.safetensors", metadata=metadata)
    assert json.loads(variants["pr13580"][1]["_quantization_metadata"])["layers"]  # the PR file is header-only
    return {tag: f"{tag}.safetensors" for tag in TAGS}


def test_pr13580_and_prefixed_files_load_in_upstream_like_the_native_file(comfyui, models, tmp_path):
    import lora_helpers as H
    from reference import kernel_tolerance
    files = _write_models(models, tmp_path / "models")
    layers = models.int4_layers
    xs = {p: H.rand_input((2, 5, U.in_features(t)), torch.float32, 3000 + 17 * i, gelu=bool(c.get("act_unsigned")))
          for i, (p, (t, c)) in enumerate(sorted(layers.items()))}
    inputs = {f"{tag}:{p}": x.clone() for tag in TAGS for p, x in xs.items()}  # the same input for every file
    import safetensors.torch
    safetensors.torch.save_file(inputs, str(tmp_path / "inputs.safetensors"))
    r = U.run_in_comfyui(comfyui.path, "load", tmp_path, models_dir=tmp_path / "models",
                         inputs=tmp_path / "inputs.safetensors", files=files)
    assert not r["errors"], U.format_errors(r["errors"])
    got = U.scenario_tensors(r)
    for tag in TAGS:
        info = r["files"][tag]
        assert set(info["layers"]) == set(layers), (tag, sorted(set(layers) ^ set(info["layers"])))
        dtype = U.dtype_from_name(info["dtype"])
        worst = 0.0
        for p, (t, conf) in layers.items():
            if "act_unsigned" in conf:  # the PR file's JSON has none: the post-GELU default must give the same
                assert info["layers"][p]["act_unsigned"] == conf["act_unsigned"], (tag, p)
            y = got[f"y.{tag}:{p}"]
            assert torch.equal(y, got[f"y.native:{p}"]), (tag, p)
            ref, mag = U.int4_reference(got[f"x.{tag}:{p}"], t, conf, dtype)
            tol = kernel_tolerance(mag, dtype, U.accumulation_length(t, conf))
            err = (y.double() - ref).abs()
            assert bool((err <= tol).all()), f"{tag} {p}: err/tol {U.worst_ratio(err, tol):.3f}"
            worst = max(worst, U.worst_ratio(err, tol))
        print(f"[{comfyui.rev} {tag}] {len(layers)} int4 layers bit-equal to the native file; dtype {info['dtype']}, "
              f"worst err/bound {worst:.3g}")

"""Int4 layers called on a strided input: a slice of a bigger tensor, as Qwen-Image's attention hands
``to_out`` the image part of the joint [text; image] sequence.

Under ``torch.no_grad`` (not inference mode), ``F.linear`` on a 3-D input that is not contiguous is decomposed
by autograd into ``matmul`` → ``expand`` of the weight, which comfy-kitchen's W4A4 layout answers by
dequantizing (an identity-input emulation that is not the W4A4 product; with K ≠ N it raises). Found by
``test_workflow.py`` (a workflow's nodes run by hand differed from the same nodes under the executor's
inference mode); ``comfy.quant.layer.linear_forward`` makes the input contiguous.

Checked on this repository's host, every int4 layer of the tiny Qwen-Image file, under ``no_grad`` and
``inference_mode``: the strided call is bit-identical to the call on a contiguous copy (same kernel, same
values), and within ``kernel_tolerance(Σ|terms|, float32, K (+R))`` of the float64 reference computed from
the stored tensors.
"""
from __future__ import annotations

import pytest
import torch

import lora_helpers as H
import upstream_env as U
from reference import kernel_tolerance


@pytest.fixture(scope="module")
def int4_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("strided") / "qwen-image-tiny-int4.safetensors"
    U.build_int4_qwen_image(path)
    return path


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_strided_input_matches_contiguous_and_reference(int4_file, mode):
    import comfy.sd
    layers = U.file_layers(int4_file)
    with U.one_thread():
        dm = comfy.sd.load_diffusion_model(str(int4_file), model_options={"dtype": torch.float32}).model.diffusion_model
    worst = {}
    for i, (path, (tensors, conf)) in enumerate(sorted(layers.items())):
        gelu = bool(conf.get("act_unsigned"))
        x = H.rand_input((2, 24, U.in_features(tensors)), torch.float32, 500 + i, gelu=gelu)[:, 8:]
        assert not x.is_contiguous()
        with U.one_thread(), mode():
            y, y_dense = dm.get_submodule(path)(x), dm.get_submodule(path)(x.contiguous())
        assert torch.equal(y, y_dense), f"{path}: strided input gives another output (max |diff| " \
                                        f"{(y - y_dense).abs().max().item():.3g})"
        ref, terms = U.int4_reference(x.contiguous(), tensors, conf, torch.float32)
        tol = kernel_tolerance(terms, torch.float32, U.accumulation_length(tensors, conf))
        worst[path] = U.worst_ratio((y.double() - ref).abs(), tol)
        assert worst[path] <= 1.0, f"{path}: error/bound {worst[path]:.3g}"
    print(f"[strided {mode.__name__}] {len(worst)} layers; worst error/bound {max(worst.values()):.3g}")

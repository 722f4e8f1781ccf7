"""What a LoRA costs on the full int4 Qwen-Image (60 blocks, rank-64 LoRA on all 840 block linears), on a GPU.

Prints, one line each:
* forward ms at 1024² (4096 image + 256 text tokens): int4; int4 + LoRA as landed now (q/k/v share one
  ``x @ proj_down``, each member a compact ``proj_up`` of its own columns); int4 + LoRA in the previous
  layout (the same weights with every member's ``proj_up`` widened with zeros over its siblings' columns,
  ``svdquant_w4a4.kitchen_view``), so the difference is the zero columns alone;
* seconds of load + patch (a LoRA never seen: its tensors are scanned) and of strength changes (a new
  clone of the same tensors, re-patched), split into the clone + checks (``load_lora_for_models``) and
  unpatch + patch (``patch_model``), min and median of 3;
* the bytes of the LoRA and the seconds one host-to-device copy of all of them takes (what every
  patch must move, as upstream's patcher does too);
* cProfile's 20 heaviest functions (own time) of one strength change.

    python3 tests_quant/gpu_lora_cost.py            # about 1-2 minutes on an H100

Without CUDA it runs the bench's small suite on the CPU (kitchen's kernels): a smoke test of the script.
"""
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import comfy.sd  # noqa: E402 (the repository root first)
from comfy.quant import kernels  # noqa: E402
from comfy.quant.formats.svdquant_w4a4 import kitchen_view, lora_columns  # noqa: E402
from comfy.quant.deltas import as_parameter, output_terms  # noqa: E402
from comfy.quant_tools import bench as B  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def _sync_s(fn):
    if CUDA:
        torch.cuda.synchronize(DEV)
    t0 = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize(DEV)
    return time.perf_counter() - t0, out


def forward_ms(model, inputs, iters=5):
    with torch.no_grad():
        for _ in range(2):
            model(*inputs)
        return statistics.median(_sync_s(lambda: model(*inputs))[0] * 1e3 for _ in range(iters))


def widen_all(model):
    """Every column-mapped member rebuilt in the previous layout (zero-padded proj_up, no map); returns
    the (module, weight) pairs to put back."""
    saved = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is not None and hasattr(w, "_params") and lora_columns(w) is not None:
            saved.append((m, w))
            wide = as_parameter(kitchen_view(w), output_terms(w))
            wide.int4_base = w.int4_base
            m.weight = wide
    return saved


def apply(patcher, lora_sd, strength):
    t_load, lora = _sync_s(lambda: comfy.sd.load_lora_for_models(patcher, None, lora_sd, strength, 0)[0])
    t_patch, _ = _sync_s(lambda: lora.patch_model(device_to=DEV))
    return t_load, t_patch, lora


def main():
    suite = B.FULL if CUDA else B.SMALL
    g = torch.Generator(device=DEV).manual_seed(0)
    shapes = B._meta_shapes(suite)
    t0 = time.perf_counter()
    patcher = comfy.sd.load_diffusion_model_state_dict(B.int4_state_dict(shapes, suite.model_rank, g),
                                                       model_options={"dtype": B.BF16, "load_device": DEV})
    patcher.patch_model(device_to=DEV)
    model = patcher.model.diffusion_model
    inputs = (B._normal((1, 16, 1, suite.latent, suite.latent), 1.0, g), torch.full((1,), 0.6, device=DEV),
              B._normal((1, suite.text_tokens, shapes["txt_norm.weight"][0]), 1.0, g))
    lora_sd = B.lora_state_dict(shapes, suite.lora_rank, g)
    name = torch.cuda.get_device_name(DEV) if CUDA else "CPU"
    print(f"device {name}; kernels {kernels.describe(DEV)}; model built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    nbytes = sum(t.numel() * t.element_size() for t in lora_sd.values())
    copy_s, _ = _sync_s(lambda: [t.to(DEV) for t in lora_sd.values()])
    print(f"LoRA: {len(lora_sd)} tensors, {nbytes / 2**30:.2f} GiB; one host-to-device copy of all: {copy_s:.3f} s")

    base_ms = forward_ms(model, inputs)
    t_load, t_patch, lora = apply(patcher, lora_sd, 1.0)
    print(f"load + patch ({len(lora.patches)} layers): {t_load + t_patch:.3f} s "
          f"(clone + checks {t_load:.3f} s, patch {t_patch:.3f} s)", flush=True)
    compact_ms = forward_ms(model, inputs)
    saved = widen_all(model)
    padded_ms = forward_ms(model, inputs)
    for m, w in saved:
        m.weight = w
    print(f"forward ms: int4 {base_ms:.1f}; + LoRA compact {compact_ms:.1f} "
          f"(+{100 * (compact_ms / base_ms - 1):.1f} %); + LoRA zero-padded (previous layout, {len(saved)} "
          f"members) {padded_ms:.1f} (+{100 * (padded_ms / base_ms - 1):.1f} %)", flush=True)

    loads, patches = [], []
    for strength in (0.5, 0.75, 1.0):
        t_load, t_patch, lora = apply(patcher, lora_sd, strength)
        loads.append(t_load)
        patches.append(t_patch)
    total = [a + b for a, b in zip(loads, patches)]
    print(f"strength change: min {min(total):.3f} s, median {statistics.median(total):.3f} s "
          f"(clone + checks median {statistics.median(loads):.3f} s, unpatch + patch median "
          f"{statistics.median(patches):.3f} s)", flush=True)

    prof = cProfile.Profile()
    prof.enable()
    apply(patcher, lora_sd, 0.6)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])
    unpatch_s, _ = _sync_s(lambda: patcher.model.current_patcher.unpatch_model())
    print(f"unpatch {unpatch_s:.3f} s")


if __name__ == "__main__":
    main()

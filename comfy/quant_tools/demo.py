"""The main job: a small seeded Qwen-Image model, quantized to int4, loaded and run through the stock path.

Everything is made locally (no downloads): a bf16 model with the real architecture (head dim 128,
RoPE axes 16/56/56) at small width, a calibration pass, the offline quantizer, ``UNETLoader``,
``LoraLoaderModelOnly``, and a report of size, timings and the checks below, each PASS or FAIL.

The checks and their thresholds:

* int4 agrees with bf16: cosine similarity of the model outputs >= ``MIN_COSINE`` (0.95). A W4A4 linear
  rounds its weight residual and its input to 15 levels per group of 64; for Gaussian-like values the group
  absmax is about 2.5 rms, so each operand carries a relative rms error near 2.5 / (7·√12) ≈ 10 %, about
  14 % for the two together. If each of the demo's 4 blocks adds at most that much to the output,
  independently, the output's relative error stays below √4 · 14 % = 28 %, a cosine of at least
  1 − 0.28²/2 ≈ 0.96; 0.95 leaves room for other seeds (the default seed gives 0.98).
* int4 with the LoRA agrees with bf16 with the LoRA: the same threshold by the same reasoning (the LoRA
  itself is applied unquantized, so it adds no error of its own). The report also says how much the LoRA
  changes each model's output, so its effect can be compared with the int4 error.
* Removing the LoRA restores the int4 model's output bit for bit (no threshold: equal or not).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from comfy.quant.errors import LoraError, OutputFileError
from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file, record_activation_stats

logger = logging.getLogger(__name__)

MIN_COSINE = 0.95  # see the module docstring for how it is derived

LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "img_mlp.net.0.proj",
                "img_mlp.net.2", "img_mod.1", "txt_mod.1")


@dataclass(frozen=True)
class DemoConfig:
    num_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 128
    joint_attention_dim: int = 256
    rank: int = 32
    latent_size: int = 32       # latent H = W (tokens = (size/2)²)
    text_tokens: int = 24
    seed: int = 0


def model_kwargs(cfg: DemoConfig) -> dict:
    return dict(num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                attention_head_dim=cfg.attention_head_dim, joint_attention_dim=cfg.joint_attention_dim)


def synthetic_state_dict(cfg: DemoConfig, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded weights shaped like a trained model's: a few strong singular directions over noise,
    and a handful of outlier input channels (what SVDQuant's low-rank branch and smoothing are for)."""
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    shapes = QwenImageTransformer2DModel(**model_kwargs(cfg), operations=comfy.ops.disable_weight_init,
                                         device="meta").state_dict()
    g = torch.Generator().manual_seed(cfg.seed)
    sd = {}
    for key, t in shapes.items():
        if key.endswith("weight") and t.dim() == 2:
            n, k = t.shape
            w = torch.randn(n, k, generator=g) / math.sqrt(k)
            r = min(8, n, k)
            w += 3 * (torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g)) / math.sqrt(k * r)
            outliers = torch.randint(0, k, (max(1, k // 64),), generator=g)
            w[:, outliers] *= 4
            sd[key] = w
        elif key.endswith("bias"):
            sd[key] = torch.randn(t.shape, generator=g) * 0.02
        else:
            sd[key] = 1 + 0.1 * torch.randn(t.shape, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def demo_inputs(cfg: DemoConfig, batch=1, seed=1):
    g = torch.Generator().manual_seed(cfg.seed + seed)
    x = torch.randn(batch, 16, 1, cfg.latent_size, cfg.latent_size, generator=g)
    context = torch.randn(batch, cfg.text_tokens, cfg.joint_attention_dim, generator=g)
    return x, torch.full((batch,), 0.6), context


def synthetic_lora(model_sd: dict, cfg: DemoConfig, rank=8, seed=7) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA on attention, MLP and modulation layers of every block."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for b in range(cfg.num_layers):
        for target in LORA_TARGETS:
            n, k = model_sd[f"transformer_blocks.{b}.{target}.weight"].shape
            base = f"transformer.transformer_blocks.{b}.{target}"
            lora[f"{base}.lora_A.weight"] = (torch.randn(rank, k, generator=g) / math.sqrt(k)).to(torch.bfloat16)
            lora[f"{base}.lora_B.weight"] = (torch.randn(n, rank, generator=g) * 0.5 / math.sqrt(rank)).to(torch.bfloat16)
            lora[f"{base}.alpha"] = torch.tensor(float(rank))
    return lora


def agreement(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, PSNR in dB with the reference's peak) of y against ref."""
    y, ref = y.double().flatten(), ref.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(y, ref, dim=0))
    mse = float((y - ref).pow(2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(float(ref.abs().max()) ** 2 / mse)
    return cos, psnr


def _run(patcher, inputs):
    """Forward on the patcher's load device (patching it first, as a sampler would); output on the CPU."""
    device = patcher.load_device
    patcher.patch_model(device_to=device)
    with torch.no_grad():
        out = patcher.model.diffusion_model(*[t.to(device) for t in inputs])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.float().cpu()


def _timed_run(patcher, inputs) -> tuple[torch.Tensor, float]:
    """(output, seconds of the second of two forwards: the first pays one-time setup)."""
    _run(patcher, inputs)
    t0 = time.perf_counter()
    y = _run(patcher, inputs)
    return y, time.perf_counter() - t0


def _save(sd, path) -> None:
    """``save_torch_file``, then the permissions an ordinary file save gives (0666 less the umask;
    safetensors' writer makes its files 0600)."""
    import comfy.utils

    comfy.utils.save_torch_file(sd, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _check_workdir(workdir) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise OutputFileError("demo: --workdir is a file; give a folder (it is made when missing)", file=workdir)


def check_lora(patcher, lora_path) -> None:
    """``LoraError`` naming ``lora_path`` when it holds no tensors or none of its keys maps onto the demo
    model (a LoRA for another model, or a model file); run before the demo's work, without logging every key."""
    import comfy.utils
    from comfy.quant_tools.lora_check import lora_check

    lora = comfy.utils.load_torch_file(lora_path)
    if not lora:
        raise LoraError("holds no tensors: not a LoRA", file=lora_path, expected="LoRA tensors", got="none")
    rows, unmapped = lora_check(patcher, lora)
    if not rows:
        shown = ", ".join(list(lora)[:3])
        raise LoraError(f"none of its {len(lora)} keys maps onto a layer of the demo's Qwen-Image model (first "
                        f"keys: {shown}); is it a LoRA for Qwen-Image (or a model file)?", file=lora_path,
                        expected="LoRA keys for Qwen-Image layers", got=f"{len(unmapped)} keys that map to no layer")


def _verdict(name: str, ok: bool, detail: str) -> tuple[bool, str]:
    return ok, f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}"


def run_demo(workdir="output/demo", cfg=DemoConfig(), lora_path=None, strength=1.0) -> tuple[str, bool]:
    """(report, whether every check passed) of the demo, its files written to ``workdir``."""
    import comfy.nodes

    t_start = time.perf_counter()
    _check_workdir(workdir)
    torch.manual_seed(cfg.seed)
    os.makedirs(workdir, exist_ok=True)
    bf16_path = os.path.join(workdir, "qwen_image_demo_bf16.safetensors")
    int4_path = os.path.join(workdir, "qwen_image_demo_int4.safetensors")
    lines = [f"Qwen-Image demo: {cfg.num_layers} blocks, dim {cfg.num_attention_heads * cfg.attention_head_dim} "
             f"({cfg.num_attention_heads}x{cfg.attention_head_dim}), text dim {cfg.joint_attention_dim}, "
             f"latent {cfg.latent_size}x{cfg.latent_size}, rank {cfg.rank}"]

    logger.info("building a seeded bf16 Qwen-Image model (%d blocks) -> %s", cfg.num_layers, bf16_path)
    sd = synthetic_state_dict(cfg)
    _save(sd, bf16_path)
    loader = comfy.nodes.UNETLoader()
    bf16 = loader.load_unet(bf16_path)[0]
    if lora_path is not None:
        logger.info("checking the LoRA %s against the model", lora_path)
        check_lora(bf16, lora_path)
    counts, report, t_quant = _quantize(sd, cfg, bf16_path, int4_path)

    logger.info("loading the int4 model with UNETLoader")
    t0 = time.perf_counter()
    int4 = loader.load_unet(int4_path)[0]
    t_load = time.perf_counter() - t0

    inputs = demo_inputs(cfg)
    logger.info("running the int4 and the bf16 model on %s (twice each: the second is timed)", int4.load_device)
    y_int4, t_int4 = _timed_run(int4, inputs)
    y_bf16, t_bf16 = _timed_run(bf16, inputs)
    cos, psnr = agreement(y_int4, y_bf16)
    total_bytes = report.quantized_bytes + report.float_bytes
    lines += [
        f"layers: {counts['svdquant_w4a4']} svdquant_w4a4, {counts['awq_w4a16']} awq_w4a16, "
        f"{report.float_tensors} float tensors kept",
        f"weight bytes: int4 file {total_bytes:,} vs bf16 {report.bf16_equivalent_bytes:,} "
        f"({total_bytes / report.bf16_equivalent_bytes:.2f}x); quantized layers alone "
        f"{report.quantized_bytes / (report.bf16_equivalent_bytes - report.float_bytes):.2f}x",
        f"time: quantize {t_quant:.2f}s, load {t_load:.2f}s; one forward: int4 {t_int4:.2f}s, bf16 {t_bf16:.2f}s "
        f"({int4.model.diffusion_model.dtype or torch.float32} compute on {int4.load_device}{_speed_note(int4)})",
    ]
    checks = [_verdict("int4 agrees with bf16", cos >= MIN_COSINE,
                       f"output cosine {cos:.5f} (needs >= {MIN_COSINE}), PSNR {psnr:.1f} dB")]
    lora_lines, lora_checks, lora_path = _lora_section(workdir, sd, cfg, int4, bf16, inputs, y_int4, y_bf16,
                                                       lora_path, strength)
    lines += lora_lines
    checks += lora_checks
    passed = all(ok for ok, _ in checks)
    lines.append(f"checks ({'all passed' if passed else 'FAILED'}; thresholds derived in comfy/quant_tools/demo.py):")
    lines += [line for _, line in checks]
    lines.append(f"files: {bf16_path}, {int4_path}, {lora_path}; total {time.perf_counter() - t_start:.1f}s")
    return "\n".join(lines), passed


def _speed_note(patcher) -> str:
    if patcher.load_device.type == "cuda":
        return ""
    return "; on the CPU int4 runs a reference path with no int4 kernels, so it is not faster: speed needs a GPU"


def _quantize(sd, cfg, bf16_path, int4_path):
    """Calibrate, quantize and validate: (layer counts, inspect report, quantize seconds)."""
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    from comfy.quant_tools.inspect_file import inspect_checkpoint

    logger.info("calibrating: input absmax of every quantizable linear over 2 seeded inputs (fp32 model)")
    ref_model = QwenImageTransformer2DModel(**model_kwargs(cfg), operations=comfy.ops.disable_weight_init,
                                            dtype=torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in sd.items()})
    calib_inputs = [demo_inputs(cfg, seed=s) for s in (11, 12)]
    calibration = record_activation_stats(ref_model, lambda: [ref_model(*i) for i in calib_inputs])

    logger.info("quantizing to int4 (rank %d) -> %s", cfg.rank, int4_path)
    t0 = time.perf_counter()
    counts = quantize_file(bf16_path, int4_path, QuantizeOptions(rank=cfg.rank), calibration=calibration,
                           overwrite=True)  # the demo's own files in its workdir
    t_quant = time.perf_counter() - t0
    logger.info("validating the int4 file (inspect)")
    report = inspect_checkpoint(int4_path)
    if report.problems:
        raise RuntimeError(f"quantized file fails validation: {report.problems}")
    return counts, report, t_quant


def _lora_section(workdir, sd, cfg, int4, bf16, inputs, y_int4, y_bf16, lora_path, strength):
    """(report lines, checks, the LoRA file) of the LoRA part: the built-in LoRA unless ``lora_path``."""
    import comfy.nodes

    if lora_path is None:
        lora_path = os.path.join(workdir, "qwen_image_demo_lora.safetensors")
        _save(synthetic_lora(sd, cfg), lora_path)
    logger.info("LoRA: loading %s at strength %s onto both models (LoraLoaderModelOnly)", lora_path, strength)
    node = comfy.nodes.LoraLoaderModelOnly()
    t0 = time.perf_counter()
    int4_lora = node.load_lora_model_only(int4, lora_path, strength)[0]
    t_attach = time.perf_counter() - t0
    bf16_lora = node.load_lora_model_only(bf16, lora_path, strength)[0]

    logger.info("LoRA: patching, running and unpatching the int4 model; running the bf16 one")
    int4.unpatch_model(device_to=int4.load_device)  # so the timing below is the LoRA alone
    t0 = time.perf_counter()
    int4_lora.patch_model(device_to=int4.load_device)
    t_patch = time.perf_counter() - t0
    y_int4_lora = _run(int4_lora, inputs)
    t0 = time.perf_counter()
    int4_lora.unpatch_model()
    t_unpatch = time.perf_counter() - t0
    y_int4_after = _run(int4, inputs)

    y_bf16_lora = _run(bf16_lora, inputs)
    bf16_lora.unpatch_model()

    effect_bf16 = float((y_bf16_lora - y_bf16).norm() / y_bf16.norm())
    effect_int4 = float((y_int4_lora - y_int4).norm() / y_int4.norm())
    cos, psnr = agreement(y_int4_lora, y_bf16_lora)
    restored = torch.equal(y_int4_after, y_int4)
    lines = [
        f"LoRA {os.path.basename(lora_path)} at strength {strength}: {len(int4_lora.patches)} layers patched; "
        f"it changes the output by {effect_int4:.1%} on int4, {effect_bf16:.1%} on bf16",
        f"LoRA time: read+map {t_attach * 1e3:.1f} ms, patch {t_patch * 1e3:.1f} ms, unpatch {t_unpatch * 1e3:.1f} ms",
    ]
    checks = [
        _verdict("int4 with the LoRA agrees with bf16 with the LoRA", cos >= MIN_COSINE,
                 f"output cosine {cos:.5f} (needs >= {MIN_COSINE}), PSNR {psnr:.1f} dB"),
        _verdict("removing the LoRA restores the int4 model", restored,
                 "output bit-exact to before the LoRA" if restored else "output differs from before the LoRA"),
    ]
    return lines, checks, lora_path

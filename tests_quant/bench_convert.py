"""Benchmark (CPU): Nunchaku → ComfyUI conversion and bf16 → int4 quantization throughput.

Not a test. Builds a Nunchaku-format Qwen-Image file at the real width (dim 3072 = 24 × 128, rank 32)
with the test-side packer, then times the streaming converter and the streaming quantizer:

    python tests_quant/bench_convert.py [--blocks 2] [--workdir DIR]

Throughput is input-file megabytes per second of wall time (file I/O included).
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy.utils  # noqa: E402
from comfy.quant_tools.demo import DemoConfig, synthetic_state_dict  # noqa: E402
from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file  # noqa: E402
from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file  # noqa: E402
from nunchaku_packer import build_fake_qwen_image  # noqa: E402


def timed_mb_per_s(fn, path):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    mb = os.path.getsize(path) / 1e6
    return mb, dt, mb / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp()
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")

    stored, metadata, _ = build_fake_qwen_image(num_blocks=args.blocks, heads=24, head_dim=128, joint_dim=3584)
    src = os.path.join(work, "nunchaku.safetensors")
    comfy.utils.save_torch_file(stored, src, metadata=metadata)
    del stored
    mb, dt, rate = timed_mb_per_s(lambda: convert_nunchaku_file(src, os.path.join(work, "converted.safetensors"),
                                                                 progress=False, overwrite=True), src)
    print(f"convert-nunchaku: {mb:.0f} MB in {dt:.2f}s = {rate:.0f} MB/s ({args.blocks} blocks at dim 3072; "
          f"x{60 / args.blocks:.0f} for the 60-block model)")

    cfg = DemoConfig(num_layers=args.blocks, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=3584)
    bf16 = os.path.join(work, "bf16.safetensors")
    comfy.utils.save_torch_file(synthetic_state_dict(cfg), bf16)
    mb, dt, rate = timed_mb_per_s(lambda: quantize_file(bf16, os.path.join(work, "int4.safetensors"),
                                                        QuantizeOptions(rank=32), progress=False, overwrite=True), bf16)
    print(f"quantize (no calibration): {mb:.0f} MB in {dt:.2f}s = {rate:.0f} MB/s")


if __name__ == "__main__":
    main()

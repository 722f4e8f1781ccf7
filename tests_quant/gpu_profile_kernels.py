"""Run each project kernel a few times at a benchmark shape, for Nsight Compute (a tool, not a test).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        -k regex:'_gemm_kernel|_awq_kernel|_quantize_kernel' -c 3 python3 tests_quant/gpu_profile_kernels.py

With ``--gluon``: only the activation pass and the warp-specialized FP8 GEMM (gluon_w4a4), rank 32.
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from comfy.quant.kernels import triton_awq as A  # noqa: E402
from comfy.quant.kernels import triton_w4a4 as W  # noqa: E402


def main():
    m, k, n = 4096, 3072, 3072
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    smooth = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    wq = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device="cuda")
    ws = torch.rand(k // 64, n, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(k, 32, device="cuda", dtype=torch.bfloat16) * 0.05
    up = torch.randn(n, 32, device="cuda", dtype=torch.bfloat16) * 0.05
    if "--gluon" in sys.argv:
        from comfy.quant.kernels import gluon_w4a4 as G
        for _ in range(2):
            q8, s8, la = W.activation(x, smooth, down, False, codes=torch.float8_e4m3fn)
            G.gemm(q8, s8, m, wq, ws, la, up, None, torch.bfloat16)
        torch.cuda.synchronize()
        return
    for _ in range(2):
        q, s = W.quantize(x, smooth, False)
        W.gemm(q, s, m, wq, ws, W.lora_activation(x, down), up, None, torch.bfloat16)
    na = 18432
    codes = torch.randint(-128, 128, (na, k // 2), dtype=torch.int8, device="cuda")
    scale = torch.rand(k // 64, na, device="cuda", dtype=torch.bfloat16) * 0.02
    zeros = torch.randn(k // 64, na, device="cuda", dtype=torch.bfloat16) * 0.01
    for _ in range(2):
        A.gemv(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), codes, scale, zeros, 64, None)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

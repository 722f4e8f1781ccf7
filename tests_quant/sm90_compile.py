"""Compile the project's W4A4 GEMM for sm_90 on a machine without a GPU and report what ptxas made of it
(a tool, not a test): registers, spills, shared memory, and which MMA instructions the SASS holds.

    python3 tests_quant/sm90_compile.py    # the configurations _config / _fp8_config pick, int8 and FP8 GEMM

Triton ships ptxas and cuobjdump, so this needs Triton but no CUDA device.
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from comfy.quant.kernels import triton_w4a4 as W  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _report(ck) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA", "I2F", "F2F",
                                                              "LDL", "STL", "MUFU", "CALL")}
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "shared": ck.metadata.shared, **{k: v for k, v in ops.items() if v}}


def gemm(m: int = 4096, n: int = 3072, k: int = 3072, rank: int = 32, **over) -> dict:
    cfg = dict(W._config(m, n, __import__("torch").device("cuda")), **over)
    opts = {o: cfg.pop(o) for o in ("num_warps", "num_stages") if o in cfg}
    sig = {"q_ptr": "*i8", "as_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*bf16", "la_ptr": "*bf16", "up_ptr": "*bf16",
           "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "M_pad": "i32", "R": "i32",
           "stride_la": "i32", "stride_up": "i32", "stride_ym": "i32"}
    const = dict(K=k, R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]), HAS_BIAS=True, MAGIC_FMA=True,
                 DOT_F32=False, ASM=cfg.pop("ASM", True), SWAP=cfg.pop("SWAP", False), PIPE=cfg.pop("PIPE", False),
                 **cfg)
    for c in const:
        sig[c] = "constexpr"
    ck = triton.compile(ASTSource(W._gemm_kernel, signature=sig, constexprs=const), target=TARGET, options=opts)
    return _report(ck)


def gemm_fp8(m: int = 4096, n: int = 3072, k: int = 3072, rank: int = 32, **over) -> dict:
    cfg = dict(W._fp8_config(m, n, __import__("torch").device("cuda")), **over)
    opts = {o: cfg.pop(o) for o in ("num_warps", "num_stages") if o in cfg}
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    sig = {"a_desc": f"tensordesc<fp8e4nv[{bm}, 32]>", "w_desc": f"tensordesc<i8[{bn}, 32]>", "as_ptr": "*fp32",
           "ws_ptr": "*bf16", "la_ptr": "*bf16", "up_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16",
           "M": "i32", "N": "i32", "M_pad": "i32", "R": "i32", "stride_la": "i32", "stride_up": "i32",
           "stride_ym": "i32"}
    const = dict(K=k, R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]), HAS_BIAS=True, DOT_F32=False,
                 ASM=cfg.pop("ASM", True), SWAP=cfg.pop("SWAP", False), **cfg)
    for c in const:
        sig[c] = "constexpr"
    ck = triton.compile(ASTSource(W._gemm_fp8_kernel, signature=sig, constexprs=const), target=TARGET, options=opts)
    return _report(ck)


def awq(m: int, n: int = 18432, k: int = 3072, **over) -> dict:
    from comfy.quant.kernels import triton_awq as A
    cfg = dict(A._config(m, n, k // 64, __import__("torch").device("cuda")), **over)
    opts = {o: cfg.pop(o) for o in ("num_warps", "num_stages") if o in cfg}
    split = cfg.pop("SPLIT_K")
    sig = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16",
           "y_ptr": "*bf16" if split == 1 else "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
    const = dict(GROUPS_PER_SPLIT=k // 64 // split, HAS_BIAS=False, DOT_F32=False, BITS=cfg.pop("BITS", True), G=64,
                 **cfg)
    for c in const:
        sig[c] = "constexpr"
    ck = triton.compile(ASTSource(A._awq_kernel, signature=sig, constexprs=const), target=TARGET, options=opts)
    return _report(ck)


def activation(k: int = 3072, rank: int = 32, **over) -> dict:
    cfg = dict(W.ACT_CONFIG, **over)
    opts = {o: cfg.pop(o) for o in ("num_warps", "num_stages") if o in cfg}
    sig = {"x_ptr": "*bf16", "smooth_ptr": "*bf16", "down_ptr": "*bf16", "unsigned_ptr": "*i8", "q_ptr": "*fp8e4nv",
           "s_ptr": "*fp32", "la_ptr": "*fp32", "M": "i32", "M_pad": "i32", "R": "i32", "stride_xm": "i32",
           "stride_down": "i32", "eps": "fp32"}
    const = dict(K=k, GROUPS=k // 64, SIGN=0, BF16=True, HAS_LA=True, DOT_F32=False,
                 BLOCK_R=max(16, triton.next_power_of_2(rank)), **cfg)
    for c in const:
        sig[c] = "constexpr"
    ck = triton.compile(ASTSource(W._activation_kernel, signature=sig, constexprs=const), target=TARGET,
                        options=opts)
    return _report(ck)


def main():
    for m in (4096, 1024):
        print(f"gemm int8 M={m}: {gemm(m=m)}", flush=True)
        print(f"gemm fp8 M={m}: {gemm_fp8(m=m)}", flush=True)
    for m in (1, 64, 4096):
        for bits in (False, True):
            print(f"awq M={m} BITS={bits}: {awq(m, BITS=bits)}", flush=True)
    print(f"activation (one pass, rank 32): {activation()}", flush=True)


if __name__ == "__main__":
    main()

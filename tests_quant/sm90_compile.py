"""Compile the project's W4A4 GEMM for sm_90 on a machine without a GPU and report what ptxas made of it
(a tool, not a test): registers, spills, shared memory, and which MMA instructions the SASS holds.

    python3 tests_quant/sm90_compile.py    # the configurations _config / _fp8_config pick, int8, FP8 and Gluon GEMM

Triton ships ptxas and cuobjdump, so this needs Triton but no CUDA device.
"""
import collections
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


def _cuobjdump(ck, flag: str) -> str:
    """``cuobjdump FLAG`` of the compiled kernel's cubin (Triton ships the tool)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, flag, path], capture_output=True, text=True).stdout


def _report(ck) -> dict:
    res = _cuobjdump(ck, "--dump-resource-usage")
    sass = _cuobjdump(ck, "-sass")
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
           "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "M_pad": "i32", "R": "i32", "R0": "i32",
           "C1": "i32", "stride_la": "i32", "stride_up": "i32", "stride_ym": "i32"}
    const = dict(K=k, R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]), SEG_ALIGNED=True, HAS_BIAS=True, MAGIC_FMA=True,
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
           "M": "i32", "N": "i32", "M_pad": "i32", "R": "i32", "R0": "i32", "C1": "i32", "stride_la": "i32",
           "stride_up": "i32", "stride_ym": "i32"}
    const = dict(K=k, R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]), SEG_ALIGNED=True, HAS_BIAS=True, DOT_F32=False,
                 ASM=cfg.pop("ASM", True), SWAP=cfg.pop("SWAP", False), **cfg)
    for c in const:
        sig[c] = "constexpr"
    ck = triton.compile(ASTSource(W._gemm_fp8_kernel, signature=sig, constexprs=const), target=TARGET, options=opts)
    return _report(ck)


def gluon_gemm(k: int = 3072, rank: int = 32, **over):
    """The warp-specialized Gluon W4A4 GEMM (``gluon_w4a4``) for sm_90: the report and the PTX (for the
    partitions' ``setmaxnreg``)."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from comfy.quant.kernels import gluon_w4a4 as G
    cfg = dict(G.CONFIG, **over)
    bt = cfg["BLOCK_T"]
    a_layout, w_layout = G.layouts(bt)
    q = torch.zeros(bt, k, dtype=torch.float8_e4m3fn)
    w = torch.zeros(G.BLOCK_W, k // 2, dtype=torch.int8)
    sig = {"a_desc": mangle_type(G.TensorDescriptor.from_tensor(q, [bt, 32], a_layout)),
           "w_desc": mangle_type(G.TensorDescriptor.from_tensor(w, [G.BLOCK_W, 32], w_layout)),
           "as_ptr": "*fp32", "ws_ptr": "*bf16", "la_ptr": "*bf16", "up_ptr": "*bf16", "bias_ptr": "*bf16",
           "y_ptr": "*bf16", **{a: "i32" for a in ("M", "N", "M_pad", "R", "R0", "C1", "stride_la", "stride_up",
                                                    "stride_ym")}}
    const = dict(GROUPS=k // 64, STAGES=cfg["STAGES"], R_BLOCKS=triton.cdiv(rank, cfg["BLOCK_R"]),
                 BLOCK_R=cfg["BLOCK_R"], HAS_BIAS=True, CONSUMER_REGS=cfg["consumer_regs"],
                 PRODUCER_REGS=cfg["producer_regs"],
                 CONVERTER_REGS=cfg["converter_regs"])
    sig.update({c: "constexpr" for c in const})
    ck = triton.compile(GluonASTSource(G._gemm_kernel, signature=sig, constexprs=const), target=TARGET,
                        options=dict(num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"]))
    return _report(ck), ck.asm["ptx"]


def ptxas_notes(ptx: str) -> list[str]:
    """ptxas's performance notes on ``ptx`` for sm_90a (e.g. C7515: warpgroup MMAs serialized because an
    in-flight accumulator is touched)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([tool, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    return [line for line in (res.stdout + res.stderr).splitlines() if "Performance" in line or "injected" in line]


def awq(m: int, n: int = 18432, k: int = 3072, split: int = 1, loop: bool = False, **over) -> dict:
    """The AWQ kernel with ``triton_awq.CONFIGS``' tiles for ``m`` rows (``over`` replaces keys; ``split`` is
    the split-K, which needs the SM count of a GPU to resolve). ``loop``: also count the instructions of the
    group loop's body (per warp and per weight element of the program's tile), the number that says how
    close to bandwidth the GEMV can get."""
    from comfy.quant.kernels import triton_awq as A
    cfg = {key: v for key, v in dict(A._bucket(m), **over).items() if key not in ("PER_SM", "SPLIT_K")}
    opts = {o: cfg.pop(o) for o in ("num_warps", "num_stages") if o in cfg}
    gemm = cfg.pop("GEMM", False)
    sig = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16",
           "y_ptr": "*bf16" if split == 1 or gemm else "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32"}
    const = dict(K=k, G=64, HAS_BIAS=False, ASM=cfg.pop("ASM", True), DOT_F32=False,
                 **dict(dict(EXACT=True, XSUM_MMA=True), **cfg))
    if gemm:
        const.setdefault("GROUP_M", 8)
    else:
        const["SPLIT_K"] = split
    for c in const:
        sig[c] = "constexpr"
    kernel = A._awq_gemm_kernel if gemm else A._awq_kernel
    ck = triton.compile(ASTSource(kernel, signature=sig, constexprs=const), target=TARGET, options=opts)
    out = _report(ck)
    if loop:
        body = _loop_body(ck)
        warps = opts.get("num_warps", 4)
        out["loop_instructions"] = len(body)
        out["loop_per_element"] = round(len(body) * warps * 32 / (cfg["BLOCK_N"] * 64), 2)  # lane-instructions
        out["loop_issue_per_mma"] = round(len(body) * warps / 4 / (cfg["BLOCK_M"] * cfg["BLOCK_N"] * 64 / 2048), 2)
        out["loop_ops"] = dict(collections.Counter(op.split(".")[0] for op in body).most_common(12))
    return out


def _loop_body(ck) -> list[str]:
    """Opcodes of the largest loop in the SASS (the code between a backward branch and its target)."""
    sass = _cuobjdump(ck, "-sass")
    ins = [(int(a, 16), op, rest) for a, op, rest in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);", sass)]
    best: list[str] = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


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
    for m in (1, 16, 64, 4096):
        for exact in (True, False) if m > 16 else (True,):
            print(f"awq M={m} EXACT={exact}: {awq(m, EXACT=exact, loop=True)}", flush=True)
    print(f"activation (one pass, rank 32): {activation()}", flush=True)
    for rank in (0, 32):
        print(f"gluon gemm rank {rank}: {gluon_gemm(rank=rank)[0]}", flush=True)


if __name__ == "__main__":
    main()

"""``python -m comfy.quant bench`` with the Hopper switches the same run measures faster (a tool, not a test).

    PYTHONPATH=$PWD python3 tests_quant/gpu_bench_best.py OUT_DIR [bench options, e.g. --only w4a4,model]

Times one W4A4 layer (4096 x 3072 -> 3072, rank 32) through each forward path (int8 GEMM after quantize
+ cuBLAS low-rank input; FP8 GEMM after the one-pass activation; the same with the warp-specialized
Gluon GEMM), turns on the fastest path's switches in ``triton_w4a4``, says which, then runs the bench.
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

from comfy.quant.kernels import triton_w4a4 as W  # noqa: E402
from gpu_hopper_bench import E4M3, us, w4a4_case  # noqa: E402

PATHS = {"int8": dict(FP8_GEMM=False, FUSED_ACTIVATION=False, WARP_SPECIALIZED=False),
         "fp8": dict(FP8_GEMM=True, FUSED_ACTIVATION=True, WARP_SPECIALIZED=False),
         "fp8_ws": dict(FP8_GEMM=True, FUSED_ACTIVATION=True, WARP_SPECIALIZED=True)}


def layer_us(c, m) -> dict:
    x = c["x"]

    def int8():
        q, s = W.quantize(x, c["smooth"], False)
        return W.gemm(q, s, m, c["w"], c["ws"], W.lora_activation(x, c["down"]), c["up"], c["bias"], x.dtype)

    def fp8(ws):
        def run():
            q, s, la = W.activation(x, c["smooth"], c["down"], False, codes=E4M3)
            return W.gemm_fp8(q, s, m, c["w"], c["ws"], la, c["up"], c["bias"], x.dtype)
        return run

    out = {}
    for name, fn in (("int8", int8), ("fp8", fp8(False)), ("fp8_ws", fp8(True))):
        for k, v in PATHS[name].items():
            setattr(W, k, v)
        out[name] = us(fn)
    return out


def main():
    m = 4096
    times = layer_us(w4a4_case(m, 3072, 3072), m)
    best = min(times, key=times.get)
    for k, v in PATHS[best].items():
        setattr(W, k, v)
    print(f"layer us {times}: bench runs the {best} path {PATHS[best]}", flush=True)
    from comfy.quant_tools.cli import main as cli
    out = sys.argv[1]
    sys.exit(cli(["bench", "--markdown", f"{out}/bench.md", "--json", f"{out}/bench.json", *sys.argv[2:]]))


if __name__ == "__main__":
    main()

"""GPU timing of a Flux-sized K-split ``linear2`` (N 3072, K 3072 + 12288) against the same layer read as
one signedness (plain W4A4, the cost floor), bf16 and FP8, on the project kernels and kitchen's path.

``python tests_quant/gpu_ksplit_bench.py`` on a CUDA machine; prints one markdown table. Timings are CUDA
events around 50 calls after 10 warm-up calls (not graph replay, so launch overhead is included: the
K-split path launches one quantize kernel per input segment).
"""
import torch

import comfy.ops
from comfy.quant import kernels
from comfy.quant.formats import encode_config
from factories import svdquant_tensors

N, K1, K2, RANK = 3072, 3072, 12288, 32


def _layer(conf):
    t = svdquant_tensors(N, K1 + K2, RANK)
    t["comfy_quant"] = encode_config(conf)
    lin = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16).Linear(K1 + K2, N, device="cuda")
    lin._load_from_state_dict({f"l.{k}": v for k, v in t.items()}, "l.", {}, True, [], [], [])
    return lin.to("cuda")


def _us(fn, x):
    for _ in range(10):
        fn(x)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        fn(x)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / 50


def main():
    split = _layer({"format": "svdquant_w4a4", "group_size": 64, "rank": RANK, "act_unsigned": [False, True],
                    "in_splits": [K1, K2]})
    plain = _layer({"format": "svdquant_w4a4", "group_size": 64, "rank": RANK, "act_unsigned": False})
    w = torch.randn(N, K1 + K2, device="cuda", dtype=torch.bfloat16) / (K1 + K2) ** 0.5
    w8, scale = w.to(torch.float8_e4m3fn), torch.ones((), device="cuda")
    print(f"device {torch.cuda.get_device_name()}; N {N}, K {K1}+{K2}, rank {RANK}")
    print("| M | K-split triton µs | plain triton µs | K-split kitchen µs | plain kitchen µs | bf16 µs | FP8 µs |")
    print("|---|---|---|---|---|---|---|")
    for m in (256, 1024, 4096):
        x = torch.randn(m, K1 + K2, device="cuda", dtype=torch.bfloat16)
        row = [m]
        for mode in ("triton", "kitchen"):
            kernels.set_mode(mode)
            row += [_us(split, x), _us(plain, x)]
        kernels.set_mode("auto")
        row.append(_us(lambda a: torch.nn.functional.linear(a, w), x))
        row.append(_us(lambda a: torch._scaled_mm(a.to(torch.float8_e4m3fn), w8.t(), scale, scale,
                                                  out_dtype=torch.bfloat16), x))
        print("| " + " | ".join(str(row[0]) if i == 0 else f"{v:.0f}" for i, v in enumerate(row)) + " |")


if __name__ == "__main__":
    main()

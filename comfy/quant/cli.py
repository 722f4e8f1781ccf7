"""``python -m comfy.quant``: demo, quantize, inspect, lora-check, convert-nunchaku, install-comfyui, bench."""
from __future__ import annotations

import argparse
import logging
import sys

from comfy.quant.errors import QuantFileError


def _demo(args):
    from comfy.quant.demo import DemoConfig, run_demo

    print(run_demo(args.workdir, DemoConfig(rank=args.rank, seed=args.seed), lora_path=args.lora,
                   strength=args.strength))


def _quantize(args):
    import sys

    import comfy.utils
    from comfy.quant.quantizer import QuantizeOptions, quantize_file
    from comfy.quant.safetensors_stream import check_output

    try:  # before any work, the calibration file included; quantize_file checks again for library callers
        check_output(args.input, args.output, "quantize", overwrite=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    calibration = comfy.utils.load_torch_file(args.calibration) if args.calibration else None
    counts = quantize_file(args.input, args.output, QuantizeOptions(rank=args.rank, smooth_alpha=args.alpha),
                           calibration=calibration)
    print(f"wrote {args.output}: {counts}")


def _inspect(args):
    from comfy.quant.inspect_file import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.file)
    print(format_report(report))
    return 1 if report.problems else 0


def _lora_check(args):
    import comfy.sd
    import comfy.utils
    from comfy.quant.lora_check import lora_check

    patcher = comfy.sd.load_diffusion_model(args.model)
    rows, unmatched = lora_check(patcher, comfy.utils.load_torch_file(args.lora))
    width = max([len(r[0]) for r in rows] + [10])
    for prefix, target, how in rows:
        print(f"{prefix:{width}}  ->  {target}  [{how}]")
    print(f"{len(rows)} LoRA modules map; {len(unmatched)} keys did not map")
    for key in unmatched:
        print(f"  NOT MAPPED {key}")
    return 1 if unmatched else 0


def _convert_nunchaku(args):
    from comfy.quant.nunchaku import convert_nunchaku_file

    summary = convert_nunchaku_file(args.input, args.output)
    print(f"wrote {args.output}: {summary}")


def _install_comfyui(args):
    import sys

    from comfy.quant.install import DEFAULT_PATCH, InstallError, check, install, uninstall

    patch = args.patch or DEFAULT_PATCH
    try:
        if args.check:
            status = check(args.path, patch)
            print(status.line())
            return 0 if status.current else 1
        print((uninstall if args.uninstall else install)(args.path, patch).line())
        return 0
    except (InstallError, OSError) as e:  # one line, no traceback
        print(f"error: {e}" if isinstance(e, InstallError) else f"error: {args.path}: {e}", file=sys.stderr)
        return 2


def _bench(args):
    import json
    import os
    import sys

    from comfy.quant.bench import SECTIONS, format_report, run_bench

    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if not sections or set(sections) - set(SECTIONS):
        print(f"error: --only takes a comma list of {', '.join(SECTIONS)}; got {args.only!r}", file=sys.stderr)
        return 2
    if args.iters is not None and args.iters < 1:
        print(f"error: --iters must be at least 1, got {args.iters}", file=sys.stderr)
        return 2
    outputs = [p for p in (args.markdown, args.json) if p]
    if len({os.path.realpath(p) for p in outputs}) < len(outputs):
        print("error: --markdown and --json name the same file", file=sys.stderr)
        return 2
    for path in outputs:  # before the run, not after minutes of it
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"error: {path}: no such directory", file=sys.stderr)
            return 2
    command = " ".join(["python -m comfy.quant bench"] + (["--small"] if args.small else [])
                       + ([f"--only {','.join(sections)}"] if sections != SECTIONS else [])
                       + ([f"--iters {args.iters}"] if args.iters else []))
    result = run_bench(small=args.small, sections=sections, iters=args.iters)
    report = format_report(result, command)
    print(report, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy.quant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; on an error, show its traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build, quantize, load and run a small Qwen-Image model, with a LoRA")
    p.add_argument("--workdir", default="output/demo")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", help="a LoRA file to use instead of the built-in one")
    p.add_argument("--strength", type=float, default=1.0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("quantize", help="float Qwen-Image safetensors -> int4 checkpoint")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.5, help="smoothing migration strength (with calibration)")
    p.add_argument("--calibration", help="safetensors of per-layer input absmax {module path: (K,)}")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("inspect", help="per-layer table and validation problems, without loading a model")
    p.add_argument("file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("lora-check", help="how a LoRA's keys map onto a model and how each applies")
    p.add_argument("model")
    p.add_argument("lora")
    p.set_defaults(func=_lora_check)

    p = sub.add_parser("convert-nunchaku", help="Nunchaku int4 file -> ComfyUI-native int4 file")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_convert_nunchaku)

    p = sub.add_parser(
        "install-comfyui", help="install this package into a ComfyUI checkout (copy comfy/quant, apply the core patch)",
        description="Copy comfy/quant into PATH/comfy/quant and apply comfy/quant/upstream/comfyui.patch to PATH "
                    "with git apply, both or neither. Running it again is a no-op; refusals leave PATH unchanged. "
                    "Exit 0 on success, 2 on a refusal or error.")
    p.add_argument("path", help="the ComfyUI checkout: the folder holding nodes.py and comfy/")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; print the state; exit 0 if installed and current, else 1")
    mode.add_argument("--uninstall", action="store_true",
                      help="reverse the patch and remove PATH/comfy/quant (refused if the patched files were edited)")
    p.add_argument("--patch", help="the patch to apply (default: comfy/quant/upstream/comfyui.patch of this package)")
    p.set_defaults(func=_install_comfyui)

    p = sub.add_parser(
        "bench", help="int4 linears and a Qwen-Image model vs bf16 and FP8 (full suite on CUDA, small on the CPU)",
        description="One run: AWQ W4A16 and SVDQuant W4A4 linears (project kernels, kitchen, bf16, FP8), a whole "
                    "Qwen-Image transformer int4 vs bf16 with and without a LoRA on every block linear, and LoRA "
                    "patch/strength/unpatch times. Prints a header and markdown tables.")
    p.add_argument("--small", action="store_true", help="the small suite (always on the CPU)")
    p.add_argument("--only", default=",".join(("awq", "w4a4", "model", "lora")),
                   help="comma list of sections: awq, w4a4, model, lora (default: all)")
    p.add_argument("--iters", type=int, help="repeat counts: graph replays / timed calls per linear, model forwards")
    p.add_argument("--markdown", metavar="PATH", help="also write the report as a markdown section to PATH")
    p.add_argument("--json", metavar="PATH", help="also write the raw rows as JSON to PATH")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (QuantFileError, OSError) as e:  # a user's input problem: one line; -v shows the traceback
        if args.verbose:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    """``<file>: <what>`` for this package's errors and the OS's."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())

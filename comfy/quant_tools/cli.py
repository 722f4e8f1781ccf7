"""``python -m comfy.quant``: demo, quantize, inspect, lora-check, convert-nunchaku, install-comfyui, bench."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback

from comfy.quant.errors import QuantFileError

EXIT_STATUS = ("exit status: 0 success; 1 demo: a check failed, inspect found problems, lora-check found keys "
               "that did not map or patches that were refused, install-comfyui --check found it not current "
               "(4: the patch is gone, 5: it does not apply); 2 a usage or input error "
               "(one line on stderr: error: <file>: <what>); 3 an internal error (a bug; one line); 130 interrupted "
               "(^C), 143 terminated (SIGTERM), 129 hung up (SIGHUP): no output or temporary file is left. "
               "-v (before or after the command) also shows the traceback of errors, with the same exit status.")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, so its cleanup runs as for ^C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_as_exceptions():
    """SIGTERM and SIGHUP raise ``Terminated`` while the command runs (the previous handlers come back)."""
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    try:
        previous = {n: signal.signal(getattr(signal, n), _raise_terminated) for n in names}
    except ValueError:  # not the main thread: signals stay as they are
        previous = {}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


def _demo(args):
    if args.comfyui:
        print("error: demo runs on this repository's embedded host only (it drives the host's own nodes); in a "
              "ComfyUI, load its int4 file with UNETLoader, and check a LoRA with lora-check --comfyui PATH",
              file=sys.stderr)
        return 2
    from comfy.quant_tools.demo import DemoConfig, run_demo

    loggers = [logging.getLogger(name) for name in ("comfy.quant", "comfy.quant_tools")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)  # each step announced as it starts, on stderr
    try:
        report, passed = run_demo(args.workdir, DemoConfig(rank=args.rank, seed=args.seed), lora_path=args.lora,
                                  strength=args.strength)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    print(report)
    return 0 if passed else 1


def _quantize(args):
    from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file

    # quantize_file refuses a bad output, input or calibration before any work, and leaves nothing on failure
    counts = quantize_file(args.input, args.output, QuantizeOptions(rank=args.rank, smooth_alpha=args.alpha),
                           calibration=args.calibration, overwrite=args.force)
    print(f"wrote {args.output}: {counts}")


def _inspect(args):
    from comfy.quant_tools.inspect_file import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.file)
    print(format_report(report))
    return 1 if report.problems else 0


def _in_comfyui(args, argv: list[str]) -> int:
    """The command again, in a subprocess whose ``comfy`` is the installed ComfyUI at ``args.comfyui``."""
    from comfy.quant_tools.comfyui_host import HostError, run

    try:
        return run(args.comfyui, argv + (["-v"] if args.verbose else []))
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _lora_check(args):
    if args.comfyui:
        return _in_comfyui(args, ["lora-check", os.path.abspath(args.model), os.path.abspath(args.lora)])
    import comfy.sd
    import comfy.utils
    from comfy.quant_tools.lora_check import lora_check

    lora = comfy.utils.load_torch_file(args.lora)
    if not lora:
        raise QuantFileError("holds no tensors: not a LoRA (expected lora_up/lora_down, lora_A/lora_B, LoHa or "
                             "LoKr tensors)", file=args.lora, expected="LoRA tensors", got="none")
    patcher = comfy.sd.load_diffusion_model(args.model)
    rows, unmatched = lora_check(patcher, lora)
    width = max([len(r[0]) for r in rows] + [10])
    for prefix, target, how in rows:
        print(f"{prefix:{width}}  ->  {target}  [{how}]")
    rejected = sum(1 for row in rows if row[2].startswith("REJECTED"))
    print(f"{len(rows)} LoRA modules map ({rejected} rejected); {len(unmatched)} keys did not map")
    for key in unmatched:
        print(f"  NOT MAPPED {key}")
    return 1 if unmatched or rejected else 0


def _convert_nunchaku(args):
    from comfy.quant_tools.convert_nunchaku import convert_nunchaku_file

    summary = convert_nunchaku_file(args.input, args.output, overwrite=args.force)
    print(f"wrote {args.output}: {summary}")


def _install_comfyui(args):
    import sys

    from comfy.quant_tools.install import InstallError, check, install, uninstall

    patch = args.patch
    try:
        if args.check:
            status = check(args.path, patch)
            print(status.line())
            return status.exit_code
        print((uninstall if args.uninstall else install)(args.path, patch).line())
        return 0
    except (InstallError, OSError) as e:  # one line, no traceback
        print(f"error: {e}" if isinstance(e, InstallError) else f"error: {args.path}: {e}", file=sys.stderr)
        return 2


def _bench(args):
    import json
    import os
    import sys

    from comfy.quant_tools.bench import SECTIONS, format_report, run_bench

    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if not sections or set(sections) - set(SECTIONS):
        print(f"error: --only takes a comma list of {', '.join(SECTIONS)}; got {args.only!r}", file=sys.stderr)
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``error: <what> (see <prog> --help)``), exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)``; options whose default is None say theirs in words."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _checked(kind, ok, expected: str):
    """An argparse ``type`` converting with ``kind`` and refusing values ``ok`` rejects."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


RANK = _checked(int, lambda v: v >= 0, "an integer >= 0")
ALPHA = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
def STRENGTH(text):  # noqa: N802 (an argparse type, named like the others)
    """A LoRA strength, with the loaders' own rule (``comfy.quant.patching.strength_problem``)."""
    from comfy.quant.patching import MAX_STRENGTH, strength_problem

    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or strength_problem(value):
        raise argparse.ArgumentTypeError(f"expected a finite number in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], "
                                         f"got {text!r}")
    return value


STRENGTH.__name__ = "float"
ITERS = _checked(int, lambda v: v >= 1, "an integer >= 1")


def _command(sub, name: str, **kwargs):
    p = sub.add_parser(name, formatter_class=_Help, **kwargs)
    _add_verbose(p, argparse.SUPPRESS)  # -v after the command as well; SUPPRESS keeps a -v given before it
    return p


def _add_verbose(parser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log at INFO level; on an error, also show its traceback (the exit status stays)"
                             + (" (default: off)" if default == argparse.SUPPRESS else ""))


def _add_demo(sub):
    p = _command(sub, "demo", help="build, quantize, load and run a small Qwen-Image model, with a LoRA")
    p.add_argument("--workdir", default="output/demo", help="folder for the demo's model, int4 and LoRA files")
    p.add_argument("--rank", type=RANK, default=32, help="low-rank branch rank of the int4 layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic model and inputs")
    p.add_argument("--lora", help="a LoRA file to use instead of the built-in one (default: a synthetic "
                                  "LoRA on every block, written to the workdir)")
    p.add_argument("--strength", type=STRENGTH, default=1.0, help="LoRA strength, as LoraLoader's (within ±100)")
    p.add_argument("--comfyui", metavar="PATH", help="not supported: the demo runs on this repository's embedded "
                                                      "host only (says so in one line, exit 2) (default: the "
                                                      "embedded host)")
    p.set_defaults(func=_demo)


def _add_quantize(sub):
    p = _command(sub, "quantize", help="float Qwen-Image / Z-Image / Flux.1 safetensors -> int4 checkpoint",
                 description="Quantize a float ComfyUI diffusion model (Qwen-Image, Z-Image-Turbo or Flux.1, "
                             "recognised from its keys) into a ComfyUI-native int4 checkpoint, with Nunchaku's "
                             "layer split: the block linears SVDQuant W4A4, the modulation linears AWQ W4A16 "
                             "(Qwen-Image, Flux), everything else float (Z-Image's adaLN and refiners too).")
    p.add_argument("input", help="a float (bf16/fp16/fp32) ComfyUI diffusion model .safetensors "
                                 "(Qwen-Image, Z-Image or Flux.1; keys without a prefix)")
    p.add_argument("output", help="the int4 .safetensors to write (refused if it exists, unless --force)")
    p.add_argument("--rank", type=RANK, default=32, help="low-rank branch rank of the W4A4 layers (0: none)")
    p.add_argument("--alpha", type=ALPHA, default=0.5, help="smoothing migration strength (with calibration)")
    p.add_argument("--calibration", help="safetensors of per-layer input absmax {module path: (K,)} "
                                         "(default: none; no smoothing)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.set_defaults(func=_quantize)


def _add_inspect_and_lora_check(sub):
    p = _command(sub, "inspect", help="per-layer table and validation problems, without loading a model")
    p.add_argument("file", help="a .safetensors file (int4, Nunchaku or float)")
    p.set_defaults(func=_inspect)

    p = _command(sub, "lora-check", help="how a LoRA's keys map onto a model and how each applies")
    p.add_argument("model", help="a diffusion model .safetensors (int4, Nunchaku or float)")
    p.add_argument("lora", help="a LoRA .safetensors")
    p.add_argument("--comfyui", metavar="PATH", help="run it with the installed ComfyUI at PATH (its comfy.sd "
                                                      "loader and comfy.lora key maps) instead of this repository's "
                                                      "embedded host (default: the embedded host)")
    p.set_defaults(func=_lora_check)


def _add_convert_nunchaku(sub):
    p = _command(sub, "convert-nunchaku", help="Nunchaku int4 file -> ComfyUI-native int4 file")
    p.add_argument("input", help="a Nunchaku svdq-int4 Qwen-Image, Z-Image or Flux.1 .safetensors (one file)")
    p.add_argument("output", help="the ComfyUI-native int4 .safetensors to write (refused if it exists, unless "
                                  "--force)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.set_defaults(func=_convert_nunchaku)


def _add_install_comfyui(sub):
    p = _command(
        sub, "install-comfyui", help="install this package into a ComfyUI checkout (copy comfy/quant, apply the core patch)",
        description="Copy comfy/quant into PATH/comfy/quant and apply comfy/quant_tools/upstream/comfyui.patch to PATH "
                    "with git apply (in a git checkout, a 3-way merge where only context moved), both or neither. "
                    "Running it again is a no-op; refusals leave PATH unchanged. After ComfyUI's updater stashed the "
                    "patch, running it again puts it back. Exit 0 on success, 2 on a refusal or error.")
    p.add_argument("path", help="the ComfyUI checkout: the folder holding nodes.py and comfy/")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; print the state in one line; exit 0 if installed and current, 1 if "
                           "install would make it so, 4 if the patch is gone but the package is there (ComfyUI's "
                           "updater stashes local changes: install again), 5 if the patch does not apply")
    mode.add_argument("--uninstall", action="store_true",
                      help="reverse the patch and remove PATH/comfy/quant (refused if the patched files were edited)")
    p.add_argument("--patch", help="the patch to apply (default: comfy/quant_tools/upstream/comfyui*.patch, the first "
                                   "that applies, else merges 3-way in a git checkout)")
    p.set_defaults(func=_install_comfyui)


def _add_bench(sub):
    p = _command(
        sub, "bench", help="int4 linears and a Qwen-Image model vs bf16 and FP8 (full suite on CUDA, small on the CPU)",
        description="One run: AWQ W4A16 and SVDQuant W4A4 linears (project kernels, kitchen, bf16, FP8), a whole "
                    "Qwen-Image transformer int4 vs bf16 with and without a LoRA on every block linear, and LoRA "
                    "patch/strength/unpatch times. Prints a header and markdown tables.")
    p.add_argument("--small", action="store_true", help="the small suite (always on the CPU)")
    p.add_argument("--only", default=",".join(("awq", "w4a4", "model", "lora")),
                   help="comma list of sections: awq, w4a4, model, lora")
    p.add_argument("--iters", type=ITERS, help="repeat counts: graph replays / timed calls per linear, model "
                                               "forwards (default: the suite's own, 20 and 5 on the full suite)")
    p.add_argument("--markdown", metavar="PATH", help="also write the report as a markdown section to PATH "
                                                      "(default: none)")
    p.add_argument("--json", metavar="PATH", help="also write the raw rows as JSON to PATH (default: none)")
    p.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m comfy.quant",
                     description="int4 (SVDQuant W4A4, AWQ W4A16) tools for Qwen-Image, Z-Image and Flux.1.",
                     epilog=EXIT_STATUS, formatter_class=_Help)
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_quantize, _add_inspect_and_lora_check, _add_convert_nunchaku, _add_install_comfyui,
                _add_bench):
        add(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _signals_as_exceptions():
            return int(args.func(args) or 0)
    except Terminated as e:
        return _failed(args, f"terminated ({e.args[0]})", 128 + e.signum)
    except KeyboardInterrupt:
        return _failed(args, "interrupted", 130)
    except (QuantFileError, OSError) as e:  # a user's input problem: one line
        return _failed(args, _one_line(e), 2)
    except Exception as e:  # a bug: still one line, never a traceback without -v
        return _failed(args, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
                       + ("" if args.verbose else " (run with -v for the traceback)"), 3)


def _failed(args, line: str, code: int) -> int:
    """Print ``error: <line>`` on stderr (after the traceback with ``-v``) and return the exit status."""
    if args.verbose:
        traceback.print_exc()
    print(f"error: {line}", file=sys.stderr)
    return code


def _one_line(e: Exception) -> str:
    """``<file>: <what>`` for this package's errors and the OS's."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())

"""Run a tool command against an installed ComfyUI: ``python -m comfy.quant lora-check --comfyui PATH ...``.

The tools need a host (``comfy.sd``, ``comfy.lora``, ...). From this repository that is the embedded host;
with ``--comfyui PATH`` the command runs again in a subprocess whose ``comfy`` package is PATH's (with its
installed ``comfy.quant``): this file, run as a script with cwd = PATH, puts PATH first on ``sys.path``, hands
upstream its own arguments (``--cpu`` where torch has no GPU, as upstream's model management needs), and
registers this repository's ``comfy/quant_tools`` (which is never installed) as ``comfy.quant_tools``: every
other ``comfy`` module, ``comfy.quant`` included, comes from PATH.

Only the standard library is imported at the top: the child must import ``comfy`` from PATH first.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_COMFY = HERE.parent  # this repository's comfy/ (holds quant_tools)
log = logging.getLogger("comfy.quant_tools.comfyui_host")


class HostError(ValueError):
    """PATH cannot host the command; the message names PATH and why, on one line."""


def run(comfyui, argv: list[str]) -> int:
    """Run ``python -m comfy.quant ARGV`` with PATH's ``comfy``; its output and exit status are the command's."""
    from comfy.quant_tools.install import InstallError, check

    root = Path(comfyui).resolve()
    try:
        status = check(root)
    except InstallError as e:
        raise HostError(str(e)) from None
    if not status.patch_applied or status.package == "absent":
        raise HostError(f"{status.line()} (the command needs the project installed there: "
                        f"python -m comfy.quant install-comfyui {root})")
    if not status.current:
        log.warning("%s", status.line())
    cmd = [sys.executable, str(Path(__file__).resolve()), str(REPO_COMFY), *argv]
    pythonpath = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}  # the child's cwd is PATH
    return subprocess.run(cmd, cwd=root, env=env).returncode


def _upstream_args() -> list[str]:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return [] if torch.cuda.is_available() or (mps is not None and mps.is_available()) else ["--cpu"]


def _import_tools(comfy, tools: Path) -> None:
    """Make ``comfy.quant_tools`` this repository's package, and only it (appending to ``comfy.__path__`` would
    let this repository's embedded host shadow upstream's namespace packages such as ``comfy.ldm``)."""
    spec = importlib.util.spec_from_file_location("comfy.quant_tools", tools / "__init__.py",
                                                  submodule_search_locations=[str(tools)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    comfy.quant_tools = module


def _child(argv: list[str]) -> int:
    root, repo_comfy, rest = os.getcwd(), argv[1], argv[2:]
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or os.curdir) != str(HERE)]
    sys.argv = [os.path.join(root, "main.py"), *_upstream_args()]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.quant

    if not Path(comfy.quant.__file__).resolve().is_relative_to(Path(root).resolve()):
        print(f"error: {root}: comfy.quant does not come from this ComfyUI ({comfy.quant.__file__})", file=sys.stderr)
        return 2
    _import_tools(comfy, Path(repo_comfy) / "quant_tools")
    from comfy.quant_tools.cli import main

    if "-v" in rest or "--verbose" in rest:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("comfy from %s, comfy.quant from %s, comfy.quant_tools from %s",
             comfy.__path__[0], comfy.quant.__path__[0], comfy.quant_tools.__path__[0])
    return main(rest)


if __name__ == "__main__":
    sys.exit(_child(sys.argv))

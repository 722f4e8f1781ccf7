"""Choosing a kernel must never break ComfyUI's start: no Triton and no kernel module at import, a
mistyped ``COMFY_INT4_KERNELS`` read as ``auto`` with one warning."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: Triton cannot be imported at all; every attempt is recorded with the
# project files on its stack, so an import of Triton by torch or comfy-kitchen (which handle its
# absence) is told apart from one by the project: the importing frame is the last real file on the stack.
_PROBE = textwrap.dedent("""
    import importlib.abc, json, sys, traceback
    ours = []
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                importer = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")][-1]
                if "/comfy/quant" in importer.filename:
                    ours.append(f"{importer.filename}:{importer.lineno}")
                raise ImportError("triton blocked by the test")
    sys.meta_path.insert(0, Block())
    import torch
    import comfy.quant.host, comfy.quant.formats
    from comfy.quant import kernels
    loaded = sorted(m for m in sys.modules if m.startswith("comfy.quant.kernels."))
    chosen = [kernels.w4a4_kernel(torch.device("cpu")), kernels.awq_kernel(torch.device("cpu"), 1)]
    print(json.dumps({"ours": ours, "loaded": loaded, "mode": kernels.mode(),
                      "after_cpu_choice": sorted(m for m in sys.modules if m.startswith("comfy.quant.kernels.")),
                      "chosen": [c is not None for c in chosen]}))
""")


def _probe(env_value=None):
    env = {k: v for k, v in os.environ.items() if k not in ("COMFY_INT4_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT
    if env_value is not None:
        env["COMFY_INT4_KERNELS"] = env_value
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_importing_the_runtime_imports_no_triton_and_no_kernel_module():
    out, _ = _probe()
    assert out["ours"] == [] and out["loaded"] == []
    # auto mode on a device without the project's kernels: nothing is loaded by choosing either
    assert out["after_cpu_choice"] == [] and out["chosen"] == [False, False]


def test_mistyped_mode_warns_once_and_runs_auto():
    out, err = _probe("tritonn")
    assert out["mode"] == "auto" and out["loaded"] == []
    assert err.count("COMFY_INT4_KERNELS='tritonn'") == 1


def test_known_modes_are_taken_from_the_environment():
    assert _probe(" Kitchen ")[0]["mode"] == "kitchen"

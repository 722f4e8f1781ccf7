"""The A/B scenario: what a ComfyUI user without int4 sees, recorded in one upstream copy (patched or not).

``test_upstream_ab.py`` runs this file (through ``upstream_env.run_script``, as ``upstream_scenarios.py``
is run: cwd = the copy, ``--cpu``) once in an UNPATCHED and once in a PATCHED copy of the same tree, and
compares the two records. It imports nothing of this repository.

One scenario, ``ab``, runs "cases" one after another. Each case records its outcome (``"ok"`` or the
exception's type and message), every log record of level INFO and above that upstream (or the patch)
emitted during it, and what it observed: detected model class and ``unet_config``, a digest (dtype, shape,
SHA-256 of the bytes) of every tensor of the diffusion model's state dict, forward outputs (as tensors, in
the ``tensors`` file). Cases, in order (file names from ``params``):

* ``load:<tag>`` for each model file: ``nodes.UNETLoader().load_unet(name, "default")``; then
  ``forward:<tag>`` (where ``params["forward"]`` names the model's inputs): the diffusion model on them;
* right after the float model ``params["lora_model"]`` (loaded first): ``modules``, which ``triton`` and
  ``comfy.quant.*`` modules ComfyUI has imported once it started, loaded that model and ran it; then
  ``lora:<tag>`` for each LoRA: ``nodes.LoraLoaderModelOnly`` on that model at a strength,
  ``comfy.model_management.load_models_gpu`` (applies the patches), the patched state dict, then
  ``unload_all_models`` and which tensors are not back to the loaded model's;
* ``qwen_forward``: upstream's ``QwenImageTransformer2DModel`` built at the float Qwen-Image file's widths
  (its own class, not detection: upstream detects Qwen-Image widths only at full size) on fixed inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import traceback

import upstream_scenarios as S  # its harness: bootstrap, folders, the scenario runner


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(self)

    def emit(self, record):
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:2000])


class Run(S.Record):
    """The A/B record: a case per input, with its outcome and INFO+ log lines; written as ``S.Record`` writes."""

    def __init__(self, params):  # not Record's: INFO-level log capture, cases instead of steps
        self.params = params
        self.result = {"cases": {}}
        self.tensors = {}
        self.log = _LogCapture()

    @contextlib.contextmanager
    def case(self, name):
        """Record the case's outcome and log lines; an exception ends the case, not the scenario."""
        rec = self.result["cases"][name] = {}
        self.log.records.clear()
        try:
            yield rec
            rec["outcome"] = "ok"
        except Exception as e:  # the outcome IS what is compared: record any error, go on with the next case
            rec["outcome"] = {"type": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e)}
            rec["traceback"] = "".join(traceback.format_exc().splitlines(True)[-15:])
        finally:
            rec["logs"] = list(self.log.records)

    def ok(self, name):
        return self.result["cases"].get(name, {}).get("outcome") == "ok"


# ---------------------------------------------------------------------------------------- records
def digest(t) -> str:
    """dtype, shape and SHA-256 of the bytes: equal digests <=> bit-identical tensors (NaNs included)."""
    import torch
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return f"{t.dtype}|{tuple(t.shape)}|{type(t).__name__}|{hashlib.sha256(raw.numpy().tobytes()).hexdigest()}"


def state_digests(module) -> dict:
    return {k: digest(v) for k, v in module.state_dict().items()}


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)


def describe(patcher) -> dict:
    model = patcher.model
    mc = model.model_config
    return {"model_class": type(model).__qualname__, "config_class": type(mc).__qualname__,
            "diffusion_model_class": type(model.diffusion_model).__qualname__,
            "unet_config": {k: _plain(v) for k, v in sorted(mc.unet_config.items())},
            "manual_cast_dtype": str(getattr(model, "manual_cast_dtype", None)),
            "model_dtype": str(model.get_dtype()), "patcher_class": type(patcher).__qualname__}


def compute_dtype(patcher):
    manual = getattr(patcher.model, "manual_cast_dtype", None)
    return manual if manual is not None else patcher.model.get_dtype()


def imported_modules() -> dict:
    names = sorted(sys.modules)
    return {"triton": [m for m in names if m == "triton" or m.startswith("triton.")],
            "kernels": [m for m in names if m.startswith("comfy.quant.kernels.")],
            "comfy_quant": [m for m in names if m == "comfy.quant" or m.startswith("comfy.quant.")]}


def _packages() -> dict:
    """Version and folder of the comfy-kitchen / comfy-aimdo this process imported."""
    import importlib.metadata
    import comfy_aimdo
    import comfy_kitchen
    return {name: [importlib.metadata.version(name), os.path.dirname(list(mod.__path__)[0])]
            for name, mod in (("comfy-kitchen", comfy_kitchen), ("comfy-aimdo", comfy_aimdo))}


# ---------------------------------------------------------------------------------------- scenario
def _forward(run, tag, patcher, inputs, kind):
    """The diffusion model on the recorded inputs (cast to its compute dtype); the output is recorded."""
    import torch
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    dtype = compute_dtype(patcher)
    dm = patcher.model.diffusion_model
    x, t, ctx = (inputs[f"{kind}.{k}"] for k in ("x", "t", "context"))
    extra = {"y": inputs[f"{kind}.y"].to(dtype), "guidance": inputs[f"{kind}.guidance"]} if kind == "flux" else {}
    with torch.no_grad():
        y = dm(x.to(dtype), t, ctx.to(dtype), **extra)
    run.tensors[f"forward:{tag}"] = y.detach().to("cpu").contiguous()
    return {"dtype": str(y.dtype), "digest": digest(y)}


def _loads(run, params, inputs):
    """Every model file through UNETLoader (and its forward where asked); the LoRAs on the float model."""
    import comfy.model_management as mm
    import nodes
    for tag, name in params["models"].items():
        patcher = None
        with run.case(f"load:{tag}") as rec:
            patcher = nodes.UNETLoader().load_unet(name, "default")[0]
            rec.update(describe(patcher))
            rec["state"] = state_digests(patcher.model.diffusion_model)
        kind = params["forward"].get(tag)
        if kind and run.ok(f"load:{tag}"):
            with run.case(f"forward:{tag}") as rec:
                rec.update(_forward(run, tag, patcher, inputs, kind))
        if tag == params["lora_model"]:
            run.result["modules"] = imported_modules()
            if patcher is not None:
                _loras(run, params, patcher)
        patcher = None
        mm.unload_all_models()


def _loras(run, params, base):
    import comfy.model_management as mm
    import nodes
    dm = base.model.diffusion_model
    before = state_digests(dm)
    for tag, (name, strength) in params["loras"].items():
        with run.case(f"lora:{tag}") as rec:
            try:
                patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, strength)[0]
                rec["patches"] = sorted(patched.patches) if hasattr(patched, "patches") else None
                mm.load_models_gpu([patched])
                rec["state"] = state_digests(dm)
            finally:
                mm.unload_all_models()
                after = state_digests(dm)
                rec["not_restored"] = sorted(k for k in before if after.get(k) != before[k])


def _qwen_forward(run, params, inputs):
    import safetensors.torch
    import torch
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    with run.case("qwen_forward") as rec:
        path = os.path.join(params["models_dir"], "diffusion_models", params["qwen_file"])
        sd = safetensors.torch.load_file(path)
        model = QwenImageTransformer2DModel(**params["qwen_kwargs"], operations=comfy.ops.disable_weight_init,
                                            dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        rec.update(missing=list(missing), unexpected=list(unexpected))
        with torch.no_grad():
            y = model(inputs["qwen.x"].to(torch.bfloat16), inputs["qwen.t"], inputs["qwen.context"].to(torch.bfloat16))
        run.tensors["qwen_forward"] = y.detach().contiguous()
        rec["digest"] = digest(y)


def scenario_ab(run, params):
    import safetensors.torch
    with run.case("startup") as rec:
        import comfy.model_management
        import comfy.sd  # noqa: F401
        import nodes  # noqa: F401
        S._setup_folders(params)
        rec["device"] = str(comfy.model_management.get_torch_device())
        rec["has_comfy_quant"] = os.path.isdir(os.path.join(os.getcwd(), "comfy", "quant"))
        rec["packages"] = _packages()
    run.result["modules_at_startup"] = imported_modules()
    inputs = safetensors.torch.load_file(params["inputs"])
    _loads(run, params, inputs)
    _qwen_forward(run, params, inputs)


SCENARIOS = {"ab": scenario_ab}


def main(argv):
    return S.run_scenario(argv, SCENARIOS, record=Run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

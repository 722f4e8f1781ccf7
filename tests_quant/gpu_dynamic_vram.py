"""int4 + LoRA inside patched upstream ComfyUI on a CUDA GPU: plain, dynamic-VRAM and low-VRAM paths.

    python3 tests_quant/gpu_dynamic_vram.py <patched upstream copy> <output dir> [--model F] [--lora F] [--cpu]

One process, set up the way upstream's ``main.py`` sets itself up on an NVIDIA GPU with torch >= 2.8
(without starting the server): ``comfy_aimdo.control.init()`` before torch is imported, ``cuda_malloc``
(cudaMallocAsync on a cu13x torch), then ``comfy_aimdo.control.init_devices(...)`` over
``get_all_torch_devices()``, ``comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic`` and
``comfy.memory_management.aimdo_enabled = True``. Then, on the demo int4 Qwen-Image file
(``python3 -m comfy.quant demo``) and its LoRA, each path runs load -> forward -> LoRA -> forward ->
switch back -> forward -> unpatch:

* ``plain``: ``comfy.sd.load_diffusion_model(..., disable_dynamic=True)`` (a ``ModelPatcher``), through
  ``comfy.model_management.load_models_gpu`` (a full load on the GPU). Its outputs are the reference;
  the same calls are repeated to measure the int4 kernels' run-to-run spread.
* ``lowvram_<frac>``: a fresh non-dynamic ``ModelPatcher``, ``patch_model(device_to=cuda,
  lowvram_model_memory=frac * model_size)`` (upstream's partial load: the rest stays on the CPU and
  is cast per forward), ``unpatch_model`` between the steps.
* ``dynamic``: ``nodes.UNETLoader`` (a ``ModelPatcherDynamic`` after the set-up above), LoRA through
  ``nodes.LoraLoaderModelOnly``, every load through ``load_models_gpu``; then an eviction (the
  patcher's ``partially_unload(None, 1e32)``, what ``free_memory`` calls under VRAM pressure),
  a forward without reloading (what the model holds then), a reload and a forward again.
* ``dynamic_switch_loop``: ``--switch-cycles`` LoRA <-> base switches through ``load_models_gpu`` on
  one ``ModelPatcherDynamic``, recording the VBAR's allocation offset after each.

``--latent N`` runs a larger input.

Checks per path: finite outputs; base and LoRA outputs within ``tol`` of the plain path's; the LoRA
delta (y1 - y0) within ``2 * tol`` of the plain path's delta; after the switch back, y2 within ``tol``
of y0; after the final unpatch every int4 tensor (codes and every side tensor) and every float
parameter bit-equal (CPU copies) to a snapshot taken after loading. ``tol = 4 * s + 2**-7 * max|y|``
where ``s`` is the largest same-call spread measured on the plain path (max abs difference between
repeats of one forward) and ``max|y|`` the plain output's peak (2**-7 * max|y|: one to two bf16 steps
at the peak, the output's own rounding).

Writes ``<output dir>/gpu_dynamic_vram.json`` (everything measured) and ``gpu_dynamic_vram.log``. A
failing path is recorded (step, exception, traceback tail) and the next path still runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = {"env": {}, "paths": {}, "checks": {}, "failures": [], "log_warnings": []}


class _Capture(logging.Handler):
    """Keeps WARNING+ records and upstream's load-summary INFO lines for the JSON."""
    KEYS = ("loaded partially", "loaded completely", "prepared for dynamic VRAM", "DynamicVRAM", "force loading",
            "not applied", "aimdo", "AIMDO")

    def emit(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING or any(k in msg for k in self.KEYS):
            RESULT["log_warnings"].append(f"{record.levelname} {record.name}: {msg[:400]}")


def _bootstrap(upstream, out_dir, cpu):
    """main.py's set-up, in its order, minus the server."""
    os.chdir(upstream)
    sys.path.insert(0, upstream)
    sys.path.append(os.path.join(HERE, "stubs"))  # after site-packages: real torchvision/torchaudio win
    sys.argv = [sys.argv[0]] + (["--cpu"] if cpu else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(os.path.join(out_dir, "gpu_dynamic_vram.log"), mode="w"),
                                  logging.StreamHandler(sys.stderr)], force=True)
    logging.getLogger().addHandler(_Capture())
    env = RESULT["env"]

    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy.cli_args import args, enables_dynamic_vram
    env["torch_imported_before_aimdo_init"] = "torch" in sys.modules
    import comfy_aimdo.control
    env["enables_dynamic_vram"] = enables_dynamic_vram()
    if enables_dynamic_vram():
        try:
            env["aimdo_init"] = comfy_aimdo.control.init(
                simple_vram_headroom=None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3))
        except TypeError:
            env["aimdo_init"] = comfy_aimdo.control.init()  # comfy-aimdo 0.4.9 protocol
    import cuda_malloc  # noqa: F401  (main.py, under __main__: cudaMallocAsync for torch +cu13x)
    env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    env["args.cuda_malloc"] = bool(args.cuda_malloc)

    import comfy.utils  # noqa: F401
    import nodes  # noqa: F401
    import comfy.model_management as mm
    import comfy.memory_management
    import comfy.model_patcher
    env["aimdo_init_devices"] = None
    if args.enable_dynamic_vram or (enables_dynamic_vram() and mm.is_nvidia() and not mm.is_wsl()):
        if (not args.enable_dynamic_vram) and mm.torch_version_numeric < (2, 8):
            env["dynamic_vram"] = "torch < 2.8: legacy ModelPatcher"
        else:
            try:
                ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3))
                                                      for d in mm.get_all_torch_devices())
            except TypeError:
                ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
            env["aimdo_init_devices"] = bool(ok)
            if ok:
                comfy_aimdo.control.set_log_info()  # console level INFO, as main.py without --verbose
                comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
                comfy.memory_management.aimdo_enabled = True
                logging.info("DynamicVRAM support detected and enabled")
    env["comfy_package_path"] = list(sys.modules["comfy"].__path__)
    env["CoreModelPatcher"] = comfy.model_patcher.CoreModelPatcher.__name__
    env["aimdo_enabled"] = bool(comfy.memory_management.aimdo_enabled)


def _versions():
    import importlib.metadata as md
    import torch
    env = RESULT["env"]
    env["python"] = sys.version.split()[0]
    env["torch"] = torch.__version__
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        free, total = torch.cuda.mem_get_info()
        env["vram_total_gib"] = round(total / 1024 ** 3, 1)
    for pkg in ("comfy-kitchen", "comfy-aimdo", "transformers", "safetensors", "numpy", "torchvision", "torchaudio"):
        try:
            env[pkg] = md.version(pkg)
        except Exception as e:  # noqa: BLE001
            env[pkg] = f"not found ({type(e).__name__})"
    import comfy.quant.host as host
    env["int4_formats"] = sorted(host.quant_algos())
    try:
        import comfy_kitchen
        env["comfy_kitchen_file"] = comfy_kitchen.__file__
        env["kitchen_backends"] = {
            name: {"available": b.get("available"), "reason": b.get("unavailable_reason"),
                   "int4_ops": [c for c in b.get("capabilities", []) if "svdquant" in c or "awq" in c or "int4" in c]}
            for name, b in comfy_kitchen.registry.list_backends().items()}
    except Exception as e:  # noqa: BLE001
        env["comfy_kitchen_file"] = repr(e)
    import comfy.model_management as mm
    env["vram_state"] = str(mm.vram_state)
    env["torch_device"] = str(mm.get_torch_device())


# ------------------------------------------------------------------------------------ helpers
def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __init__(self, store, name):
        self.store, self.name = store, name

    def __enter__(self):
        _sync()
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        _sync()
        self.store[self.name] = round((time.perf_counter() - self.t) * 1e3, 2)  # ms


def _int4_modules(dm):
    import comfy.quant.host as host
    return [(n, m) for n, m in dm.named_modules() if host.is_int4(getattr(m, "weight", None))]


def _int4_tensors(w):
    out = {"_qdata": w._qdata}
    for f in dataclasses.fields(w._params):
        v = getattr(w._params, f.name)
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            out[f.name] = v
    return out


def snapshot(dm):
    """CPU copies of every int4 tensor (codes + side tensors) and every float parameter and buffer."""
    import comfy.quant.host as host
    snap = {}
    for name, m in dm.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if host.is_int4(p):
                for k, t in _int4_tensors(p).items():
                    snap[f"{name}.{pname}/{k}"] = t.detach().to("cpu", copy=True)
                snap[f"{name}.{pname}/#output_terms"] = len(host.output_terms(p))
            else:
                snap[f"{name}.{pname}"] = p.detach().to("cpu", copy=True)
        for bname, b in m.named_buffers(recurse=False):
            if b is not None:
                snap[f"{name}.{bname}"] = b.detach().to("cpu", copy=True)
    return snap


def compare_snapshots(before, after):
    import torch
    bad = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a is None or b is None:
            bad.append(f"{k}: {'missing after' if b is None else 'new after'}")
        elif isinstance(a, int) or isinstance(b, int):
            if a != b:
                bad.append(f"{k}: {a} -> {b}")
        elif a.shape != b.shape or a.dtype != b.dtype:
            bad.append(f"{k}: {tuple(a.shape)}/{a.dtype} -> {tuple(b.shape)}/{b.dtype}")
        elif not torch.equal(a, b):
            bad.append(f"{k}: values differ (max abs {float((a.float() - b.float()).abs().max()):.3g})")
    n_int4 = sum(1 for k in before if "/_qdata" in k)
    return {"tensors_compared": len(before), "int4_weights": n_int4, "mismatches": len(bad), "first": bad[:8],
            "bit_equal": not bad}


class ForwardProbe:
    """Counts, per ``_forward`` call of an int4 linear, whether it got an int4 weight (the kernel path)
    or a float one (a host dequantized it first), the weight's device, and how ``run_linear_group``
    grouped q/k/v. Wraps instance attributes only; changes nothing that runs."""

    def __init__(self, dm):
        import comfy.quant.host as host
        import comfy.quant.layer as layer
        self.counts = {}
        self.restore = []
        for n, m in _int4_modules(dm):
            orig = m._forward

            def wrapped(input, weight, bias, _orig=orig):
                kind = "int4" if host.is_int4(weight) else f"float:{getattr(weight, 'dtype', None)}"
                key = f"{kind}@{weight.device.type}"
                self.counts[key] = self.counts.get(key, 0) + 1
                return _orig(input, weight, bias)
            m._forward = wrapped
            self.restore.append(m)
        orig_group = host.run_linear_group

        def group(input, modules, _orig=orig_group):
            key = "group:shared" if layer._shared_format(modules, input.device) is not None else "group:one_by_one"
            self.counts[key] = self.counts.get(key, 0) + 1
            return _orig(input, modules)
        self._orig_group = orig_group
        host.run_linear_group = group

    def take(self):
        c, self.counts = self.counts, {}
        return c

    def close(self):
        import comfy.quant.host as host
        host.run_linear_group = self._orig_group
        for m in self.restore:
            m.__dict__.pop("_forward", None)


def forward(dm, inputs, device, probe=None, store=None, name=None):
    import torch
    t0 = time.perf_counter()
    with torch.no_grad():
        y = dm(*[t.to(device) for t in inputs])
    _sync()
    ms = (time.perf_counter() - t0) * 1e3
    if store is not None:
        store[f"forward_{name}_ms"] = round(ms, 2)
        if probe is not None:
            store[f"forward_{name}_calls"] = probe.take()
    return y.float().cpu()


def state_of(patcher):
    """Where the int4 weights are and what upstream attached to their modules."""
    import comfy.quant.host as host
    import comfy.quant.patching as patching
    dm = patcher.model.diffusion_model
    mods = _int4_modules(dm)
    s = {"int4_modules": len(mods), "weight_on_cuda": 0, "patched(int4_base)": 0, "with_vbar(_v)": 0,
         "weight_function": 0, "weight_lowvram_function": 0, "comfy_cast_weights": 0, "output_terms": 0}
    for _, m in mods:
        s["weight_on_cuda"] += m.weight.device.type == "cuda"
        s["patched(int4_base)"] += patching.is_patched(m.weight)
        s["with_vbar(_v)"] += hasattr(m, "_v")
        s["weight_function"] += len(getattr(m, "weight_function", []) or []) > 0
        s["weight_lowvram_function"] += getattr(m, "weight_lowvram_function", None) is not None
        s["comfy_cast_weights"] += bool(getattr(m, "comfy_cast_weights", False))
        s["output_terms"] += len(host.output_terms(m.weight)) > 0
    seen = {}
    for _, m in mods:
        for t in _int4_tensors(m.weight).values():
            if t.numel():
                seen[(t.device.type, t.data_ptr())] = t.nbytes
    for dev in sorted({d for d, _ in seen}):
        s[f"int4_unique_kb_{dev}"] = sum(v for (d, _), v in seen.items() if d == dev) // 1024
    s["patcher"] = type(patcher).__name__
    s["patches"] = len(patcher.patches)
    s["backup"] = len(patcher.backup)
    model = patcher.model
    s["model_lowvram"] = bool(getattr(model, "model_lowvram", False))
    s["lowvram_patch_counter"] = int(getattr(model, "lowvram_patch_counter", 0) or 0)
    s["model_loaded_weight_memory_kb"] = int(getattr(model, "model_loaded_weight_memory", 0) or 0) // 1024
    try:
        s["loaded_size_kb"] = int(patcher.loaded_size()) // 1024
    except Exception as e:  # noqa: BLE001
        s["loaded_size_kb"] = repr(e)
    import torch
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        s["cuda_used_mib"] = (total - free) // 2 ** 20
    return s


def qkv_tied(dm):
    """Whether block 0's to_q/to_k/to_v weights share one proj_down tensor (SVDQuant activation tie)."""
    a = dm.transformer_blocks[0].attn
    try:
        return a.to_q.weight._params.proj_down is a.to_k.weight._params.proj_down
    except AttributeError:
        return None


def stats(y):
    import torch
    return {"finite": bool(torch.isfinite(y).all()), "max_abs": float(y.abs().max()), "mean_abs": float(y.abs().mean())}


def diff(a, b):
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)),
            "bit_exact": bool(a.shape == b.shape and (a == b).all())}


# ------------------------------------------------------------------------------------ paths
def _record_failure(path, step, e):
    tb = traceback.format_exc()
    entry = {"path": path, "step": step, "error": f"{type(e).__name__}: {e}"[:2000], "traceback_tail": tb[-6000:]}
    RESULT["failures"].append(entry)
    RESULT["paths"].setdefault(path, {})["failed_at"] = step
    logging.error("path %s failed at %s: %s\n%s", path, step, e, tb)


def _switch_back_and_unload(ctx, P, T, base, dm, probe, snap):
    """After a LoRA clone ran: ``load_models_gpu([base])``, forward (returned), ``unload_all_models``;
    the patcher states and tensor snapshots go into ``P``."""
    import comfy.model_management as mm
    P["at"] = "switch back (load_models_gpu(base))"
    with Timer(T, "load_models_gpu_switch_back"):
        mm.load_models_gpu([base])
    P["state_switched_back"] = state_of(base)
    P["at"] = "forward after switch"
    y2 = forward(dm, ctx.inputs, ctx.device, probe, T, "switched_back")
    P["snapshot_after_switch_back"] = compare_snapshots(snap, snapshot(dm))
    P["at"] = "unpatch (unload_all_models)"
    with Timer(T, "unload_all_models"):
        mm.unload_all_models()
    P["state_unloaded"] = state_of(base)
    P["snapshot_after_unpatch"] = compare_snapshots(snap, snapshot(dm))
    return y2


def run_plain(ctx):
    import comfy.sd
    import comfy.model_management as mm
    import nodes
    P = RESULT["paths"].setdefault("plain", {})
    T = P.setdefault("ms", {})
    P["at"] = "load"
    try:
        with Timer(T, "load_file"):
            base = comfy.sd.load_diffusion_model(ctx.model, disable_dynamic=True)
        dm = base.model.diffusion_model
        snap = snapshot(dm)
        P["patcher"] = type(base).__name__
        probe = ForwardProbe(dm)
        P["at"] = "load_models_gpu(base)"
        with Timer(T, "load_models_gpu_base"):
            mm.load_models_gpu([base])
        P["state_base"] = state_of(base)
        P["qkv_tied_base"] = qkv_tied(dm)
        P["at"] = "forward base"
        y0 = forward(dm, ctx.inputs, ctx.device, probe, T, "base_first")
        reps = [forward(dm, ctx.inputs, ctx.device, probe, T, f"base_rep{i}") for i in range(3)]
        P["at"] = "LoRA attach"
        with Timer(T, "lora_attach"):
            lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, ctx.lora_name, 1.0)[0]
        P["lora_patches"] = len(lora.patches)
        P["at"] = "load_models_gpu(lora)"
        with Timer(T, "load_models_gpu_lora"):
            mm.load_models_gpu([lora])
        P["state_lora"] = state_of(lora)
        P["qkv_tied_lora"] = qkv_tied(dm)
        P["at"] = "forward lora"
        y1 = forward(dm, ctx.inputs, ctx.device, probe, T, "lora_first")
        reps1 = [forward(dm, ctx.inputs, ctx.device, probe, T, f"lora_rep{i}") for i in range(2)]
        y2 = _switch_back_and_unload(ctx, P, T, base, dm, probe, snap)
        probe.close()

        spread0 = max(diff(r, y0)["max_abs"] for r in reps)
        spread1 = max(diff(r, y1)["max_abs"] for r in reps1)
        s = max(spread0, spread1)
        peak = float(y0.abs().max())
        tol = 4 * s + 2 ** -7 * peak
        ctx.ref = {"y0": y0, "y1": y1, "tol": tol, "spread": s}
        P["spread"] = {"base_max_abs": spread0, "lora_max_abs": spread1,
                       "base_bit_exact_repeats": all(diff(r, y0)["bit_exact"] for r in reps),
                       "lora_bit_exact_repeats": all(diff(r, y1)["bit_exact"] for r in reps1)}
        P["bound"] = {"tol": tol, "formula": "4*s + 2**-7*max|y0|", "s": s, "max|y0|": peak}
        P["y0"], P["y1"], P["y2"] = stats(y0), stats(y1), stats(y2)
        P["lora_effect_rel_l2"] = diff(y1, y0)["rel_l2"]
        P["y2_vs_y0"] = diff(y2, y0)
        RESULT["checks"]["plain"] = {
            "finite": all(stats(y)["finite"] for y in (y0, y1, y2)),
            "lora_changes_output": diff(y1, y0)["max_abs"] > 10 * max(s, 1e-6),
            "switch_back_restores_output": diff(y2, y0)["max_abs"] <= tol,
            "unpatch_restores_int4_tensors": P["snapshot_after_unpatch"]["bit_equal"],
            "lora_patches_36": P["lora_patches"] == 36,
        }
    except Exception as e:  # noqa: BLE001
        _record_failure("plain", P.get("at"), e)
    finally:
        try:
            mm.unload_all_models()
        except Exception:  # noqa: BLE001
            pass


def _compare_to_ref(name, P, y0, y1, y2):
    ctx_ref = CTX.ref
    if ctx_ref is None:
        RESULT["checks"][name] = {"finite": all(stats(y)["finite"] for y in (y0, y1, y2)), "no_reference": True}
        return
    tol = ctx_ref["tol"]
    r0, r1 = ctx_ref["y0"], ctx_ref["y1"]
    P["y0_vs_plain"], P["y1_vs_plain"], P["y2_vs_y0"] = diff(y0, r0), diff(y1, r1), diff(y2, y0)
    P["delta_vs_plain"] = diff(y1 - y0, r1 - r0)
    P["tol"] = tol
    RESULT["checks"][name] = {
        "finite": all(stats(y)["finite"] for y in (y0, y1, y2)),
        "base_matches_plain": P["y0_vs_plain"]["max_abs"] <= tol,
        "lora_matches_plain": P["y1_vs_plain"]["max_abs"] <= tol,
        "lora_delta_matches_plain": P["delta_vs_plain"]["max_abs"] <= 2 * tol,
        "switch_back_restores_output": P["y2_vs_y0"]["max_abs"] <= tol,
    }


def run_lowvram(ctx, frac):
    import comfy.sd
    import comfy.model_management as mm
    import nodes
    name = f"lowvram_{frac:g}"
    P = RESULT["paths"].setdefault(name, {})
    T = P.setdefault("ms", {})
    P["at"] = "load"
    try:
        with Timer(T, "load_file"):
            base = comfy.sd.load_diffusion_model(ctx.model, disable_dynamic=True)
        dm = base.model.diffusion_model
        snap = snapshot(dm)
        size = base.model_size()
        budget = max(1, int(frac * size))
        P["model_size_kb"], P["lowvram_model_memory_kb"] = size // 1024, budget / 1024
        probe = ForwardProbe(dm)
        dev = ctx.device
        P["at"] = "patch_model(base, lowvram)"
        with Timer(T, "patch_model_base"):
            base.patch_model(device_to=dev, lowvram_model_memory=budget)
        P["state_base"] = state_of(base)
        P["at"] = "forward base"
        y0 = forward(dm, ctx.inputs, dev, probe, T, "base_first")
        forward(dm, ctx.inputs, dev, probe, T, "base_rep0")
        P["at"] = "unpatch_model(base)"
        with Timer(T, "unpatch_base"):
            base.unpatch_model(device_to=base.offload_device)
        P["at"] = "LoRA attach"
        with Timer(T, "lora_attach"):
            lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, ctx.lora_name, 1.0)[0]
        P["lora_patches"] = len(lora.patches)
        P["at"] = "patch_model(lora, lowvram)"
        with Timer(T, "patch_model_lora"):
            lora.patch_model(device_to=dev, lowvram_model_memory=budget)
        P["state_lora"] = state_of(lora)
        P["at"] = "forward lora"
        y1 = forward(dm, ctx.inputs, dev, probe, T, "lora_first")
        forward(dm, ctx.inputs, dev, probe, T, "lora_rep0")
        P["at"] = "unpatch_model(lora)"
        with Timer(T, "unpatch_lora"):
            lora.unpatch_model(device_to=lora.offload_device)
        P["state_lora_unpatched"] = state_of(lora)
        P["snapshot_after_lora_unpatch"] = compare_snapshots(snap, snapshot(dm))
        P["at"] = "switch back: patch_model(base, lowvram)"
        with Timer(T, "patch_model_switch_back"):
            base.patch_model(device_to=dev, lowvram_model_memory=budget)
        P["at"] = "forward after switch"
        y2 = forward(dm, ctx.inputs, dev, probe, T, "switched_back")
        P["at"] = "final unpatch_model(base)"
        with Timer(T, "unpatch_final"):
            base.unpatch_model(device_to=base.offload_device)
        P["state_unloaded"] = state_of(base)
        P["snapshot_after_unpatch"] = compare_snapshots(snap, snapshot(dm))
        probe.close()
        P["y0"], P["y1"], P["y2"] = stats(y0), stats(y1), stats(y2)
        _compare_to_ref(name, P, y0, y1, y2)
        RESULT["checks"][name]["unpatch_restores_int4_tensors"] = P["snapshot_after_unpatch"]["bit_equal"]
        RESULT["checks"][name]["partial_load"] = P["state_base"]["model_lowvram"]
    except Exception as e:  # noqa: BLE001
        _record_failure(name, P.get("at"), e)


def run_dynamic(ctx):
    import comfy.model_management as mm
    import nodes
    P = RESULT["paths"].setdefault("dynamic", {})
    T = P.setdefault("ms", {})
    P["at"] = "load (UNETLoader)"
    try:
        with Timer(T, "load_file"):
            base = nodes.UNETLoader().load_unet(os.path.basename(ctx.model), "default")[0]
        P["patcher"] = type(base).__name__
        dm = base.model.diffusion_model
        snap = snapshot(dm)
        P["qkv_tied_loaded"] = qkv_tied(dm)
        probe = ForwardProbe(dm)
        P["at"] = "load_models_gpu(base)"
        with Timer(T, "load_models_gpu_base"):
            mm.load_models_gpu([base])
        P["state_base"] = state_of(base)
        P["at"] = "forward base"
        y0 = forward(dm, ctx.inputs, ctx.device, probe, T, "base_first")
        y0r = forward(dm, ctx.inputs, ctx.device, probe, T, "base_rep0")
        P["base_repeat"] = diff(y0r, y0)
        P["at"] = "LoRA attach (LoraLoaderModelOnly)"
        with Timer(T, "lora_attach"):
            lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, ctx.lora_name, 1.0)[0]
        P["lora_patcher"] = type(lora).__name__
        P["lora_patches"] = len(lora.patches)
        P["at"] = "load_models_gpu(lora)"
        with Timer(T, "load_models_gpu_lora"):
            mm.load_models_gpu([lora])
        P["state_lora"] = state_of(lora)
        P["at"] = "forward lora"
        y1 = forward(dm, ctx.inputs, ctx.device, probe, T, "lora_first")
        y1r = forward(dm, ctx.inputs, ctx.device, probe, T, "lora_rep0")
        P["lora_repeat"] = diff(y1r, y1)
        P["at"] = "evict under pressure (partially_unload(None, 1e32)) + reload lora"
        with Timer(T, "evict"):
            freed = lora.partially_unload(None, 1e32)
        P["evicted_kb"] = int(freed or 0) // 1024
        P["state_evicted"] = state_of(lora)
        y1x = forward(dm, ctx.inputs, ctx.device, probe, T, "lora_evicted_no_reload")
        P["evicted_no_reload_vs_lora"], P["evicted_no_reload_vs_base"] = diff(y1x, y1), diff(y1x, y0)
        with Timer(T, "load_models_gpu_lora_after_evict"):
            mm.load_models_gpu([lora])
        P["state_lora_reloaded"] = state_of(lora)
        y1e = forward(dm, ctx.inputs, ctx.device, probe, T, "lora_after_evict")
        P["lora_after_evict_vs_lora"] = diff(y1e, y1)
        y2 = _switch_back_and_unload(ctx, P, T, base, dm, probe, snap)
        P["at"] = "forward after unload (re-fault)"
        with Timer(T, "load_models_gpu_again"):
            mm.load_models_gpu([base])
        y3 = forward(dm, ctx.inputs, ctx.device, probe, T, "after_reload")
        P["reload_vs_y0"] = diff(y3, y0)
        mm.unload_all_models()
        probe.close()
        P["y0"], P["y1"], P["y2"] = stats(y0), stats(y1), stats(y2)
        _compare_to_ref("dynamic", P, y0, y1, y2)
        c = RESULT["checks"]["dynamic"]
        c["is_ModelPatcherDynamic"] = P["patcher"] == "ModelPatcherDynamic"
        c["unpatch_restores_int4_tensors"] = P["snapshot_after_unpatch"]["bit_equal"]
        if CTX.ref is not None:
            c["lora_after_evict_matches"] = P["lora_after_evict_vs_lora"]["max_abs"] <= CTX.ref["tol"]
            c["reload_matches"] = P["reload_vs_y0"]["max_abs"] <= CTX.ref["tol"]
    except Exception as e:  # noqa: BLE001
        _record_failure("dynamic", P.get("at"), e)
    finally:
        try:
            mm.unload_all_models()
        except Exception:  # noqa: BLE001
            pass


def _vbar_info(patcher):
    vbar = patcher.model.dynamic_vbars.get(patcher.load_device) if hasattr(patcher.model, "dynamic_vbars") else None
    if vbar is None:
        return None
    return {"offset_kb": vbar.offset // 1024, "max_kb": vbar.max_size // 1024, "loaded_kb": int(vbar.loaded_size()) // 1024}


def run_dynamic_switch_loop(ctx, cycles):
    """LoRA <-> base switches on one ModelPatcherDynamic: the VBAR's bump offset after each (its address
    space is 10x the model size and allocations are never returned; a force-loaded module loses its
    ``_v`` and gets a new one when it is streamed again)."""
    import comfy.model_management as mm
    import nodes
    P = RESULT["paths"].setdefault("dynamic_switch_loop", {})
    T = P.setdefault("ms", {})
    P["at"] = "load"
    try:
        base = nodes.UNETLoader().load_unet(os.path.basename(ctx.model), "default")[0]
        dm = base.model.diffusion_model
        snap = snapshot(dm)
        lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, ctx.lora_name, 1.0)[0]
        mm.load_models_gpu([base])
        y0 = forward(dm, ctx.inputs, ctx.device)
        P["vbar"] = [("base", _vbar_info(base))]
        worst = {"base": 0.0, "lora": 0.0}
        for i in range(cycles):
            P["at"] = f"cycle {i}: load_models_gpu(lora)"
            with Timer(T, f"cycle{i}_load_lora"):
                mm.load_models_gpu([lora])
            y1 = forward(dm, ctx.inputs, ctx.device)
            P["at"] = f"cycle {i}: load_models_gpu(base)"
            with Timer(T, f"cycle{i}_load_base"):
                mm.load_models_gpu([base])
            y2 = forward(dm, ctx.inputs, ctx.device)
            P["vbar"].append((f"cycle{i}", _vbar_info(base)))
            if CTX.ref is not None:
                worst["lora"] = max(worst["lora"], diff(y1, CTX.ref["y1"])["max_abs"])
                worst["base"] = max(worst["base"], diff(y2, CTX.ref["y0"])["max_abs"])
            P["cycles_done"] = i + 1
        P["at"] = "unload_all_models"
        mm.unload_all_models()
        P["snapshot_after_unpatch"] = compare_snapshots(snap, snapshot(dm))
        P["worst_vs_plain"] = worst
        P["y0_vs_plain"] = diff(y0, CTX.ref["y0"]) if CTX.ref is not None else None
        c = RESULT["checks"]["dynamic_switch_loop"] = {"all_cycles_ran": P["cycles_done"] == cycles,
                                                       "unpatch_restores_int4_tensors": P["snapshot_after_unpatch"]["bit_equal"]}
        if CTX.ref is not None:
            c["outputs_match_plain"] = max(worst.values()) <= CTX.ref["tol"]
    except Exception as e:  # noqa: BLE001
        _record_failure("dynamic_switch_loop", P.get("at"), e)
        RESULT["checks"]["dynamic_switch_loop"] = {"all_cycles_ran": False}
    finally:
        try:
            mm.unload_all_models()
        except Exception:  # noqa: BLE001
            pass


class _Ctx:
    ref = None


CTX = _Ctx()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", help="patched upstream ComfyUI copy (with comfy/quant in it)")
    ap.add_argument("out", help="output folder (JSON + log)")
    ap.add_argument("--model", default=None, help="int4 demo file (default <repo>/.gpu-demo/qwen_image_demo_int4.safetensors)")
    ap.add_argument("--lora", default=None, help="LoRA file (default: qwen_image_demo_lora.safetensors beside --model)")
    ap.add_argument("--cpu", action="store_true", help="run upstream with --cpu (a local check of this script)")
    ap.add_argument("--lowvram-fracs", default="0.5,0", help="fractions of the model size for the low-VRAM loads")
    ap.add_argument("--switch-cycles", type=int, default=16, help="LoRA <-> base switches in dynamic_switch_loop")
    ap.add_argument("--only", default="plain,dynamic,lowvram,switch_loop", help="which paths to run (comma list)")
    ap.add_argument("--latent", type=int, default=None, help="latent H = W of the demo input (default: demo's 32)")
    a = ap.parse_args(argv)
    upstream, out = os.path.abspath(a.upstream), os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    model = os.path.abspath(a.model or os.path.join(HERE, "..", ".gpu-demo", "qwen_image_demo_int4.safetensors"))
    lora = os.path.abspath(a.lora or os.path.join(os.path.dirname(model), "qwen_image_demo_lora.safetensors"))
    t_start = time.perf_counter()
    RESULT["env"]["argv"] = sys.argv[:]
    try:
        _bootstrap(upstream, out, a.cpu)
        _versions()
    except Exception as e:  # noqa: BLE001
        _record_failure("setup", "bootstrap", e)
        _write(out, t_start)
        return 1

    import torch
    import folder_paths
    import comfy.model_management as mm
    from comfy.quant_tools.demo import DemoConfig, demo_inputs
    folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(model))
    folder_paths.add_model_folder_path("loras", os.path.dirname(lora))
    CTX.model, CTX.lora_name = model, os.path.basename(lora)
    CTX.device = mm.get_torch_device()
    CTX.inputs = demo_inputs(DemoConfig() if a.latent is None else DemoConfig(latent_size=a.latent))
    RESULT["env"]["model_file"] = f"{os.path.basename(model)} ({os.path.getsize(model)} bytes)"
    RESULT["env"]["lora_file"] = f"{os.path.basename(lora)} ({os.path.getsize(lora)} bytes)"
    RESULT["env"]["inputs"] = [list(t.shape) for t in CTX.inputs]
    torch.manual_seed(0)

    only = set(a.only.split(","))
    if "plain" in only:
        run_plain(CTX)
    if "dynamic" in only:
        run_dynamic(CTX)
    if "lowvram" in only:
        for frac in [float(f) for f in a.lowvram_fracs.split(",") if f != ""]:
            run_lowvram(CTX, frac)
    if "switch_loop" in only:
        run_dynamic_switch_loop(CTX, a.switch_cycles)
    return _write(out, t_start)


def _write(out, t_start):
    RESULT["env"]["total_s"] = round(time.perf_counter() - t_start, 2)
    RESULT.pop("_ref", None)
    all_ok = not RESULT["failures"] and all(v for c in RESULT["checks"].values() for k, v in c.items()
                                            if isinstance(v, bool) and k != "no_reference")
    RESULT["all_checks_pass"] = all_ok
    with open(os.path.join(out, "gpu_dynamic_vram.json"), "w") as f:
        json.dump(RESULT, f, indent=1, default=str)
    print("=== checks ===")
    for path, c in RESULT["checks"].items():
        print(f"{path}: " + ", ".join(f"{k}={v}" for k, v in c.items()))
    for fl in RESULT["failures"]:
        print(f"FAILED {fl['path']} at {fl['step']}: {fl['error'][:300]}")
    print("all_checks_pass:", all_ok)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

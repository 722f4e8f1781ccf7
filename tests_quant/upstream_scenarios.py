"""Scenarios that run INSIDE a copy of upstream ComfyUI, one per subprocess.

Upstream's ``comfy`` package has the same name as this repository's host ``comfy`` package, so the two
can never share a process: ``upstream_env.run_in_comfyui`` launches

    python3 tests_quant/upstream_scenarios.py SCENARIO PARAMS_JSON -- --cpu

with cwd = the ComfyUI copy and PYTHONPATH = the copy + ``tests_quant/stubs``. This file imports nothing
of this repository (only upstream, and ``comfy.quant`` where the patched copy carries it).

A scenario drives upstream's own entry points (nodes, ``comfy.sample``, ``comfy.model_management``) and
RECORDS what it sees: a JSON result (``params["result"]``) and the tensors the checks need (a safetensors
file, ``params["tensors"]``). The expectations (float64 references, tolerances) are computed and
asserted in the pytest process (``test_upstream_comfyui.py``), from the files it made itself. Steps are
recorded one by one (``Record.step``): an exception in one step is written down with its traceback
tail and the scenario goes on, so one run reports every failure; the process fails only when its
set-up fails.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------- harness
class Record:
    def __init__(self, params):
        self.params = params
        self.result = {"steps": {}, "errors": {}, "warnings": {}}
        self.tensors = {}
        self._log = _LogCapture()

    @contextlib.contextmanager
    def step(self, name):
        """Run a step: its WARNING+ log lines and, if it raises, the traceback tail are recorded."""
        self._log.records.clear()
        t0 = time.perf_counter()
        try:
            yield
            self.result["steps"][name] = "ok"
        except Exception:
            self.result["steps"][name] = "failed"
            self.result["errors"][name] = "".join(traceback.format_exc().splitlines(True)[-25:])
        finally:
            self.result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 3)
            if self._log.records:
                self.result["warnings"][name] = list(self._log.records)

    def ok(self, name):
        return self.result["steps"].get(name) == "ok"

    def put(self, key, tensor):
        self.tensors[key] = tensor.detach().to("cpu").contiguous().clone()

    def write(self):
        if self.tensors:
            import safetensors.torch
            safetensors.torch.save_file(self.tensors, self.params["tensors"])
            self.result["tensors"] = self.params["tensors"]
        tmp = self.params["result"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(tmp, self.params["result"])


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []
        logging.getLogger().addHandler(self)

    def emit(self, record):
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:500])


def _bootstrap(argv):
    """Parse our own arguments, hand upstream its CLI arguments (``--cpu``) and enable its arg parsing."""
    name, params = argv[1], json.loads(argv[2])
    upstream_args = argv[argv.index("--") + 1:] if "--" in argv else []
    sys.argv = [argv[0], *upstream_args]
    # this script's folder (tests_quant/) is sys.path[0]; nothing of this repository may shadow upstream
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    torch.set_num_threads(int(params.get("threads", 1)))  # tiny matrices; also: same reductions as the parent
    return name, params


def _setup_folders(params):
    """Point upstream's folder_paths at the test's models folder and a scratch output folder."""
    import folder_paths
    models = params["models_dir"]
    folder_paths.add_model_folder_path("diffusion_models", os.path.join(models, "diffusion_models"), is_default=True)
    folder_paths.add_model_folder_path("loras", os.path.join(models, "loras"), is_default=True)
    out = os.path.join(params["workdir"], "output")
    os.makedirs(out, exist_ok=True)
    folder_paths.set_output_directory(out)
    return folder_paths


# ---------------------------------------------------------------------------------------- helpers
def _quantized_tensor_types():
    """Upstream's QuantizedTensor class (``comfy.quant_ops``) and kitchen's, which should be the same."""
    import comfy.quant_ops
    import comfy_kitchen.tensor
    return comfy.quant_ops.QuantizedTensor, comfy_kitchen.tensor.QuantizedTensor


def _int4_modules(diffusion_model):
    """{module path: module} of every module whose ``weight`` is a kitchen QuantizedTensor."""
    qt_types = _quantized_tensor_types()
    return {name: m for name, m in diffusion_model.named_modules()
            if isinstance(getattr(m, "weight", None), qt_types)}


def _layer_info(m):
    """What the checks need about one layer: its class, its weight's class, layout and parameters."""
    import torch
    import comfy.quant_ops
    import comfy_kitchen.tensor
    w = m.weight
    params = getattr(w, "_params", None)
    info = {
        "module_class": type(m).__qualname__,
        "module_module": type(m).__module__,
        "weight_class": f"{type(w).__module__}.{type(w).__qualname__}",
        "is_upstream_quantized_tensor": isinstance(w, comfy.quant_ops.QuantizedTensor),
        "is_kitchen_quantized_tensor": isinstance(w, comfy_kitchen.tensor.QuantizedTensor),
        "is_parameter": isinstance(w, torch.nn.Parameter),
        "layout": str(getattr(w, "_layout_cls", None)),
        "in_features": m.in_features,
        "out_features": m.out_features,
    }
    for key in ("act_unsigned", "rank", "group_size"):
        if params is not None and hasattr(params, key):
            v = getattr(params, key)
            info[key] = v.item() if hasattr(v, "item") else v
    return info


def _compute_dtype(patcher):
    manual = getattr(patcher.model, "manual_cast_dtype", None)
    return manual if manual is not None else patcher.model.get_dtype()


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _load_unet(name):
    import nodes
    return nodes.UNETLoader().load_unet(name, "default")[0]


def _state_dict_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _compare_state_dicts(before, after):
    """Keys whose tensors differ (value or dtype or shape), keys missing, keys added."""
    import torch
    differ = [k for k in before if k in after and
              not (before[k].dtype == after[k].dtype and before[k].shape == after[k].shape
                   and torch.equal(before[k], after[k]))]
    return {"differ": differ, "missing": sorted(set(before) - set(after)), "added": sorted(set(after) - set(before)),
            "count": len(before)}


def _shared_qkv_pointers(diffusion_model):
    """Per q/k/v group: data_ptr of each member's smoothing factor and proj_down."""
    out = {}
    for name, m in diffusion_model.named_modules():
        for group in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            if not all(hasattr(m, g) for g in group):
                continue
            ptrs = {}
            for attr in ("smooth_factor", "proj_down"):
                ptrs[attr] = []
                for g in group:
                    params = getattr(getattr(getattr(m, g), "weight", None), "_params", None)
                    t = getattr(params, attr, None)
                    ptrs[attr].append(None if t is None else t.data_ptr())
            out[f"{name}.{group[0]}"] = ptrs
    return out


class AttentionProbe:
    """Calls one block's attention with fixed inputs and captures its q/k/v projections (image stream).

    Inputs: the kwargs the block passed to its attention during one full-model forward of the unpatched
    model (so the rotary embedding and shapes are the model's own). Capture points are upstream's: forward
    pre-hooks on ``attn.norm_q`` / ``attn.norm_k`` (their input is ``to_q`` / ``to_k`` of the image stream,
    as (B, heads, S, D)) and the ``attn1_patch`` transformer patch (its ``v`` is [text; image] values).
    Whatever path the model takes to compute q/k/v (one module at a time or grouped), this sees its result.
    """

    def __init__(self, patcher, block, model_inputs):
        import torch
        dm = patcher.model.diffusion_model
        self.attn = dm.transformer_blocks[block].attn
        seen = {}

        def grab(_mod, args, kwargs):
            seen["args"], seen["kwargs"] = args, dict(kwargs)

        h = self.attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                dm(*model_inputs)
        finally:
            h.remove()
        if seen.get("args"):
            raise RuntimeError(f"attention called with positional args {len(seen['args'])}: probe expects kwargs")
        self.kwargs = {k: v for k, v in seen["kwargs"].items() if k != "transformer_options"}
        self.x = self.kwargs["hidden_states"]

    def run(self):
        import torch
        cap = {}

        def pre(key):
            def hook(_mod, args):
                t = args[0]
                cap[key] = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
            return hook

        def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
            start, end = extra_options["img_slice"]
            t = v[:, :, start:end]
            cap["to_v"] = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
            return {}

        hooks = [self.attn.norm_q.register_forward_pre_hook(pre("to_q")),
                 self.attn.norm_k.register_forward_pre_hook(pre("to_k"))]
        try:
            with torch.no_grad():
                self.attn(**self.kwargs, transformer_options={"patches": {"attn1_patch": [attn1_patch]}})
        finally:
            for h in hooks:
                h.remove()
        return cap


# -------------------------------------------------------------------------------------- scenarios
def scenario_smoke(rec, params):
    """Upstream imports on CPU with the stand-ins; folder_paths sees the test's folders. On an
    unpatched copy, also records what plain upstream does with the int4 file (it cannot load it)."""
    with rec.step("imports"):
        import comfy.model_management
        import comfy.sample
        import comfy.sd
        import comfy_extras.nodes_lora_debug
        import comfy_extras.nodes_model_merging
        import folder_paths  # noqa: F401
        import nodes
        rec.result["imported"] = ["nodes", "comfy.sd", "comfy.sample", "comfy.model_management",
                                  "comfy_extras.nodes_lora_debug", "comfy_extras.nodes_model_merging",
                                  "folder_paths"]
        rec.result["node_classes"] = {
            "UNETLoader": hasattr(nodes, "UNETLoader"), "LoraLoader": hasattr(nodes, "LoraLoader"),
            "LoraLoaderModelOnly": hasattr(nodes, "LoraLoaderModelOnly"),
            "LoraLoaderBypass": hasattr(comfy_extras.nodes_lora_debug, "LoraLoaderBypass"),
            "ModelSave": hasattr(comfy_extras.nodes_model_merging, "ModelSave")}
        rec.result["torch_device"] = str(comfy.model_management.get_torch_device())
        rec.result["has_comfy_quant"] = os.path.isdir(os.path.join(os.getcwd(), "comfy", "quant"))
    with rec.step("folders"):
        fp = _setup_folders(params)
        rec.result["diffusion_models"] = fp.get_filename_list("diffusion_models")
        rec.result["loras"] = fp.get_filename_list("loras")
        rec.result["output_directory"] = fp.get_output_directory()
    if params.get("try_load"):
        try:
            _load_unet(params["try_load"])
            rec.result["plain_load"] = "loaded"
        except Exception as e:
            rec.result["plain_load"] = f"{type(e).__name__}: {e}"[:300]


def scenario_load(rec, params):
    """UNETLoader on each file; every int4 layer's class/layout and its output on the given inputs."""
    import safetensors.torch
    import torch
    _setup_folders(params)
    inputs = safetensors.torch.load_file(params["inputs"])
    rec.result["files"] = {}
    for tag, name in params["files"].items():
        info = rec.result["files"][tag] = {}
        with rec.step(f"load {tag}"):
            patcher = _load_unet(name)
        if not rec.ok(f"load {tag}"):
            continue
        with rec.step(f"inspect {tag}"):
            dm = patcher.model.diffusion_model
            dtype = _compute_dtype(patcher)
            info["dtype"] = _dtype_name(dtype)
            info["model_class"] = type(patcher.model).__name__
            info["patcher_class"] = type(patcher).__name__
            info["layers"] = {p: _layer_info(m) for p, m in _int4_modules(dm).items()}
        with rec.step(f"outputs {tag}"):
            import comfy.model_management
            comfy.model_management.load_models_gpu([patcher])
            for p, m in _int4_modules(dm).items():
                x = inputs[f"{tag}:{p}"].to(dtype)
                with torch.no_grad():
                    y = m(x)
                rec.put(f"x.{tag}:{p}", x)
                rec.put(f"y.{tag}:{p}", y)
        del patcher
        import comfy.model_management
        comfy.model_management.unload_all_models()


def scenario_lora(rec, params):
    """Three LoRA nodes, two clones used alternately, a strength change and the unpatch, on one model.

    Tags of recorded outputs (direct call of each probed layer, and the grouped q/k/v of one attention):
    base, A1 (LoraLoaderModelOnly, LoRA A), B (another clone, LoRA B), A2 (clone A again), As2 (LoRA A at
    another strength, same node instance), LoraLoader (clip None), bypass (LoraLoaderBypass), after (all
    unloaded).
    """
    import safetensors.torch
    import torch
    import comfy.model_management as mm
    import comfy_extras.nodes_lora_debug
    import nodes
    _setup_folders(params)
    inputs = safetensors.torch.load_file(params["inputs"])
    loras, s = params["loras"], params["strengths"]

    with rec.step("load"):
        base = _load_unet(params["model"])
        dm = base.model.diffusion_model
        dtype = _compute_dtype(base)
        rec.result["dtype"] = _dtype_name(dtype)
        mm.load_models_gpu([base])
        probe = AttentionProbe(base, params["attention_block"],
                               [inputs["model.x"].to(dtype), inputs["model.t"], inputs["model.context"].to(dtype)])
        rec.put("attn.x", probe.x)
        xs = {p: inputs[f"x:{p}"].to(dtype) for p in params["probes"]}
        for p, x in xs.items():
            rec.put(f"x:{p}", x)
        before = _state_dict_copy(dm)
        rec.result["shared_before"] = _shared_qkv_pointers(dm)
    if not rec.ok("load"):
        return

    def outputs(tag, patcher):
        if patcher is not None:
            mm.load_models_gpu([patcher])
        with torch.no_grad():
            for p, x in xs.items():
                rec.put(f"{tag}:{p}", dm.get_submodule(p)(x))
            for k, v in probe.run().items():
                rec.put(f"{tag}:grouped.{k}", v)
        if patcher is not None:
            rec.result.setdefault("patch_counts", {})[tag] = len(patcher.patches)

    node_a = nodes.LoraLoaderModelOnly()
    with rec.step("base"):
        outputs("base", base)
    with rec.step("A1"):
        clone_a = node_a.load_lora_model_only(base, loras["A"], s["A"])[0]
        outputs("A1", clone_a)
    with rec.step("B"):
        clone_b = nodes.LoraLoaderModelOnly().load_lora_model_only(base, loras["B"], s["B"])[0]
        outputs("B", clone_b)
    with rec.step("A2"):
        outputs("A2", clone_a)
    with rec.step("As2"):
        clone_as2 = node_a.load_lora_model_only(base, loras["A"], s["A2"])[0]
        outputs("As2", clone_as2)
    with rec.step("LoraLoader"):
        m_full, clip = nodes.LoraLoader().load_lora(base, None, loras["A"], s["A"], s["A"])
        rec.result["LoraLoader_clip"] = repr(clip)
        outputs("LoraLoader", m_full)
    with rec.step("bypass"):
        m_bypass, _ = comfy_extras.nodes_lora_debug.LoraLoaderBypass().load_lora(base, None, loras["A"], s["A"], 0.0)
        rec.result["bypass_injections"] = sorted(m_bypass.injections)
        outputs("bypass", m_bypass)
    with rec.step("unpatch"):
        mm.unload_all_models()
        outputs("after", None)
        rec.result["unpatch"] = _compare_state_dicts(before, _state_dict_copy(dm))
        rec.result["shared_after"] = _shared_qkv_pointers(dm)


def scenario_sample(rec, params):
    """comfy.sample.sample (euler) on the int4 model and on it with a LoRA; twice for the base model."""
    import safetensors.torch
    import comfy.sample
    import nodes
    _setup_folders(params)
    inputs = safetensors.torch.load_file(params["inputs"])
    latent, pos, neg = inputs["latent"], inputs["positive"], inputs["negative"]
    positive, negative = [[pos, {}]], [[neg, {}]]
    with rec.step("load"):
        base = _load_unet(params["model"])
        rec.result["dtype"] = _dtype_name(_compute_dtype(base))
        with_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(base, params["lora"], params["strength"])[0]
    if not rec.ok("load"):
        return
    latent = comfy.sample.fix_empty_latent_channels(base, latent)  # as nodes.common_ksampler: 4-D → (B, C, 1, H, W)
    rec.result["latent_shape"] = list(latent.shape)
    noise = comfy.sample.prepare_noise(latent, params["seed"])
    rec.put("noise", noise)
    for tag, model in (("base", base), ("lora", with_lora), ("base_again", base)):
        with rec.step(tag):
            out = comfy.sample.sample(model, noise, params["steps"], params["cfg"], params["sampler"],
                                      params["scheduler"], positive, negative, latent, seed=params["seed"],
                                      disable_pbar=True)
            rec.put(tag, out)


def scenario_save(rec, params):
    """state_dict → comfy.utils.save_torch_file, and the ModelSave node; each reloaded via UNETLoader."""
    import safetensors
    import comfy.model_management as mm
    import comfy.utils
    import comfy_extras.nodes_model_merging
    fp = _setup_folders(params)
    resaved = os.path.join(params["workdir"], "resaved")
    os.makedirs(resaved, exist_ok=True)
    fp.add_model_folder_path("diffusion_models", resaved)
    fp.add_model_folder_path("diffusion_models", os.path.join(fp.get_output_directory(), "diffusion_models"))
    rec.result["files"] = {}
    for tag, name in params["files"].items():
        info = rec.result["files"][tag] = {"saved": {}}
        with rec.step(f"load {tag}"):
            model = _load_unet(name)
            original = _state_dict_copy(model.model.diffusion_model)
            info["layers"] = sorted(_int4_modules(model.model.diffusion_model))
        if not rec.ok(f"load {tag}"):
            continue
        targets = {}
        with rec.step(f"save_torch_file {tag}"):
            path = os.path.join(resaved, f"{tag}_state_dict.safetensors")
            comfy.utils.save_torch_file(model.model.diffusion_model.state_dict(), path)
            targets["save_torch_file"] = path
        with rec.step(f"ModelSave {tag}"):
            prefix = f"diffusion_models/{tag}_modelsave"
            comfy_extras.nodes_model_merging.ModelSave().save(model, prefix)
            found = sorted(glob.glob(os.path.join(fp.get_output_directory(), prefix + "_*.safetensors")))
            if not found:
                raise FileNotFoundError(f"ModelSave wrote no {prefix}_*.safetensors")
            targets["ModelSave"] = found[-1]
        for how, path in targets.items():
            entry = info["saved"][how] = {"file": os.path.basename(path)}
            with rec.step(f"read {how} {tag}"):
                with safetensors.safe_open(path, "pt") as f:
                    keys = list(f.keys())
                    entry["metadata_keys"] = sorted((f.metadata() or {}).keys())
                    quant = {k: f.get_tensor(k) for k in keys if k.endswith(".comfy_quant")}
                model_prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.")
                                     if any(k.startswith(p) for k in keys)), "")
                entry["key_prefix"] = model_prefix
                entry["comfy_quant"] = {k[len(model_prefix):-len(".comfy_quant")]:
                                        json.loads(bytes(v.tolist()).decode("utf-8")) for k, v in quant.items()}
            with rec.step(f"reload {how} {tag}"):
                again = _load_unet(os.path.basename(path))
                dm2 = again.model.diffusion_model
                entry["compare"] = _compare_state_dicts(original, _state_dict_copy(dm2))
                entry["layers"] = {p: _layer_info(m) for p, m in _int4_modules(dm2).items()}
                del again, dm2
        del model
        mm.unload_all_models()


def scenario_lora_layers(rec, params):
    """``LoraLoaderModelOnly`` with each of ``params["loras"]`` ({tag: [name, strength]}) on one model: the
    probed layers' outputs on the given inputs unpatched ("base"), per LoRA, and after every model is
    unloaded ("after"); the patched keys per LoRA; the state dict before vs after."""
    import safetensors.torch
    import torch
    import comfy.model_management as mm
    import nodes
    _setup_folders(params)
    inputs = safetensors.torch.load_file(params["inputs"])
    with rec.step("load"):
        base = _load_unet(params["model"])
        dm = base.model.diffusion_model
        dtype = _compute_dtype(base)
        rec.result["dtype"] = _dtype_name(dtype)
        before = _state_dict_copy(dm)

    call = params.get("model_call")  # {"tensors": kwarg names of inputs["model.<name>"], "scalars": {...}}

    def probe(tag, patcher):
        mm.load_models_gpu([patcher])
        dm_ = patcher.model.diffusion_model
        with torch.no_grad():
            for p in params["probes"]:
                rec.put(f"{tag}:{p}", dm_.get_submodule(p)(inputs[p].to(dtype)))
            if call:  # the whole transformer on one input (x, timestep, context positional)
                kw = {k: inputs[f"model.{k}"].to(dtype) for k in call["tensors"]} | call.get("scalars", {})
                args = [inputs["model.x"].to(dtype), inputs["model.t"], inputs["model.context"].to(dtype)]
                rec.put(f"{tag}:model", dm_(*args, **kw))

    if not rec.ok("load"):
        return
    with rec.step("base"):
        probe("base", base)
        for p in params["probes"]:
            rec.put(f"x:{p}", inputs[p].to(dtype))
    rec.result["patched"] = {}
    for tag, (name, strength) in params["loras"].items():
        with rec.step(tag):
            patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, strength)[0]
            rec.result["patched"][tag] = sorted(patched.patches)
            probe(tag, patched)
            del patched
    with rec.step("after"):
        mm.unload_all_models()
        probe("after", base)
        rec.result["unpatch"] = _compare_state_dicts(before, _state_dict_copy(dm))


def scenario_lora_check(rec, params):
    """``comfy.quant_tools.lora_check.lora_check`` (what ``python -m comfy.quant lora-check`` prints) on the model
    ``UNETLoader`` gives for ``params["model"]`` and the LoRA file ``params["lora"]``."""
    import importlib.util

    import comfy.utils
    import folder_paths
    # the tools are never installed into ComfyUI: load this checkout's lora_check.py (it needs only comfy.quant)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "comfy", "quant_tools",
                        "lora_check.py")
    spec = importlib.util.spec_from_file_location("int4_lora_check", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    has_problems, lora_check = tool.has_problems, tool.lora_check
    _setup_folders(params)
    with rec.step("check"):
        patcher = _load_unet(params["model"])
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", params["lora"]))
        rows, unmapped = lora_check(patcher, lora)
        rec.result["rows"] = [list(r) for r in rows]
        rec.result["unmapped"] = unmapped
        rec.result["has_problems"] = has_problems(rows, unmapped)


def _outcome(fn):
    """What a user meets: ``{"outcome": "ok", "value": fn()}`` or the error's type, its classes and message."""
    try:
        return {"outcome": "ok", "value": fn()}
    except Exception as e:
        return {"outcome": "error", "type": type(e).__name__, "classes": [c.__name__ for c in type(e).__mro__],
                "message": str(e)[:600]}


def scenario_hostile(rec, params):
    """Bad files through upstream's own loaders: ``UNETLoader`` on each of ``params["files"]``, then
    ``LoraLoaderModelOnly`` on the good model with each of ``params["loras"]`` ({tag: [name, strength]}),
    recording per case the outcome, the patched keys and the WARNING+ log lines."""
    import comfy.utils
    import nodes
    import folder_paths
    _setup_folders(params)
    rec.result["files"] = {tag: _outcome(lambda n=name: type(_load_unet(n)).__name__)
                           for tag, name in params["files"].items()}
    with rec.step("load good"):
        base = _load_unet(params["model"])
    if not rec.ok("load good"):
        return
    rec.result["loras"] = {}
    for tag, (name, strength) in params["loras"].items():
        with rec.step(f"lora {tag}"):
            def apply(name=name, strength=strength):
                patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, strength)[0]
                return sorted(patched.patches)
            rec.result["loras"][tag] = _outcome(apply)
    rec.result["lora_file_direct"] = _outcome(
        lambda: len(comfy.utils.load_torch_file(folder_paths.get_full_path("loras", params["corrupt_lora"]))))


def scenario_arch_keys(rec, params):
    """UNETLoader on float files of other architectures (``params["files"]``: {tag: name}); per file: the
    detected model class and supported-model config class, the unet_config, the loaded diffusion model's
    state-dict keys and shapes, and the ``unet missing`` / ``unet unexpected`` warnings. A tag listed in
    ``params["zimage_shim"]`` whose plain load fails is loaded again under ``_zimage_width_shim`` (below);
    ``info["attempts"]`` keeps each attempt's outcome, ``info["shim"]`` what the shim supplied (None when
    the plain load worked) and ``info["loaded_by"]`` which attempt loaded the file."""
    import comfy.model_management as mm

    @contextlib.contextmanager
    def _zimage_width_shim(info):
        """Upstream knows Z-Image only at dim 3840 (the ``dim == 3840`` branch of the Lumina 2 detection sets
        heads, RoPE, FFN multiplier, z_image_modulation, ...; ``supported_models.ZImage`` matches ``dim: 3840``).
        For a smaller file this supplies just those constructor arguments, read from unquantized tensors
        (head dim from ``layers.0.attention.q_norm.weight``; Z-Image is told from Lumina 2 by its SiLU-less
        ``layers.0.adaLN_modulation.0``), and lets ZImage match on ``z_image_modulation``. Everything else (model
        class, construction, weight loading, its warnings) stays upstream's. Undone on exit."""
        import comfy.model_detection as md
        import comfy.supported_models as sm
        orig_detect, orig_match = md.detect_unet_config, sm.ZImage.unet_config

        def detect(state_dict, key_prefix, metadata=None):
            conf = orig_detect(state_dict, key_prefix, metadata=metadata)
            p = key_prefix
            if (conf and conf.get("image_model") == "lumina2" and "n_heads" not in conf
                    and f"{p}layers.0.adaLN_modulation.0.weight" in state_dict):
                head_dim = state_dict[f"{p}layers.0.attention.q_norm.weight"].shape[0]
                heads = conf["dim"] // head_dim
                conf.update(n_heads=heads, n_kv_heads=heads, axes_dims=[head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8],
                            axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                            z_image_modulation=True, time_scale=1000.0)
                if f"{p}cap_pad_token" in state_dict:
                    conf["pad_tokens_multiple"] = 32
                info["applied"] = {k: conf[k] for k in ("dim", "n_heads", "n_kv_heads", "axes_dims")}
            return conf

        md.detect_unet_config = detect
        sm.ZImage.unet_config = {"image_model": "lumina2", "z_image_modulation": True}
        try:
            yield
        finally:
            md.detect_unet_config = orig_detect
            sm.ZImage.unet_config = orig_match

    _setup_folders(params)
    rec.result["files"] = {}
    for tag, name in params["files"].items():
        info = rec.result["files"][tag] = {"shim": None}
        attempts = [("plain", contextlib.nullcontext())]
        if tag in params.get("zimage_shim", ()):
            shim = {}
            attempts.append(("shim", _zimage_width_shim(shim)))
        for how, ctx in attempts:
            step = f"load {tag} {how}"
            with rec.step(step):
                with ctx:
                    patcher = _load_unet(name)
                mc = patcher.model.model_config
                dm = patcher.model.diffusion_model
                info.update(model_class=type(patcher.model).__name__, config_class=type(mc).__name__,
                            diffusion_model_class=type(dm).__name__,
                            unet_config={k: (v if isinstance(v, (bool, int, float, str, list, tuple, type(None)))
                                             else repr(v)) for k, v in mc.unet_config.items()},
                            state_dict={k: list(v.shape) for k, v in dm.state_dict().items()})
            warnings = rec.result["warnings"].get(step, [])
            info.setdefault("attempts", {})[how] = {
                "ok": rec.ok(step), "error": rec.result["errors"].get(step, "")[-1500:],
                "missing": [w for w in warnings if "unet missing" in w],
                "unexpected": [w for w in warnings if "unet unexpected" in w]}
            if rec.ok(step):
                if how == "shim":
                    info["shim"] = shim.get("applied")
                break
        info["loaded_by"] = next((h for h, a in info["attempts"].items() if a["ok"]), None)
        patcher = None
        mm.unload_all_models()


SCENARIOS = {"smoke": scenario_smoke, "load": scenario_load, "lora": scenario_lora, "sample": scenario_sample,
             "save": scenario_save, "hostile": scenario_hostile,
             "lora_layers": scenario_lora_layers, "lora_check": scenario_lora_check, "arch_keys": scenario_arch_keys}


def run_scenario(argv, scenarios, bootstrap=None, record=None):
    """Run ``scenarios[name]`` from ``argv`` (``SCRIPT NAME PARAMS_JSON -- upstream args``) and always write
    its record; other scenario files (A/B, workflow) run through this too."""
    name, params = (bootstrap or _bootstrap)(argv)
    rec = (record or Record)(params)
    try:
        scenarios[name](rec, params)
    finally:
        rec.write()
    return 0


def main(argv):
    return run_scenario(argv, SCENARIOS)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

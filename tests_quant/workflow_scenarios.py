"""The workflow scenario of ``test_workflow.py``, run INSIDE a copy of upstream ComfyUI (one subprocess).

Launched by ``upstream_env.run_script(WORKFLOW_SCENARIOS, ...)`` exactly as ``run_in_comfyui`` launches
``upstream_scenarios.py`` (whose harness it reuses: ``Record``, the ``--cpu`` bootstrap, folder set-up).
``scenario_executor`` queues API-format prompts on upstream's own ``execution.PromptExecutor`` (made and
called as ``main.py``'s ``prompt_worker`` does, after ``execution.validate_prompt`` as ``server.py``'s
``POST /prompt`` does), then reads the base model back from the executor's cache and runs the same
nodes one by one in Python. It records; ``test_workflow.py`` asserts.
"""
from __future__ import annotations

import asyncio
import sys

import upstream_scenarios as S
import workflow_nodes


class StubServer:
    """What ``PromptExecutor`` uses of ``server.PromptServer``: it keeps the messages sent to the client."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def _cache_args():
    """``main.py``'s default cache: RAM pressure, with its default headroom (GB)."""
    import comfy.model_management as mm
    return {"lru": 0, "ram": min(10.0, max(2.0, mm.total_ram * 0.10 / 1024.0)),
            "ram_inactive": min(128.0, mm.total_ram / 1024.0)}


def _cached_output(executor, node_id, index=0):
    entry = asyncio.run(executor.caches.outputs.get(node_id))
    return None if entry is None else entry.outputs[index][0]


def _summary(server, prompt_id):
    """Per prompt: the nodes served from the cache, the nodes executed, and any error message."""
    mine = [(e, d) for e, d in server.messages if isinstance(d, dict) and d.get("prompt_id") == prompt_id]
    cached = [n for e, d in mine if e == "execution_cached" for n in d["nodes"]]
    executed = [d["node"] for e, d in mine if e == "executing" and d.get("node") is not None]
    errors = [{k: d.get(k) for k in ("node_id", "exception_type", "exception_message")}
              for e, d in mine if e == "execution_error"]
    return {"cached": sorted(cached), "executed": executed, "errors": errors}


def by_hand(wf):
    """The workflow's nodes called one by one: (stage-1 latent, stage-2 latent) tensors."""
    import nodes
    base = nodes.UNETLoader().load_unet(wf["unet"], "default")[0]
    branch = {}
    for b in ("branch1", "branch2"):
        model = base
        for name, strength in wf[b]:
            model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
        branch[b] = model
    cond = workflow_nodes.Int4TestConditioning()
    positive, negative = cond.encode(*wf["positive"])[0], cond.encode(*wf["negative"])[0]
    latent = nodes.EmptyLatentImage().generate(wf["width"], wf["height"], 1)[0]
    s = wf["sampler"]
    stage1 = nodes.KSampler().sample(branch["branch1"], wf["seed1"], s["steps"], s["cfg"], s["sampler_name"],
                                     s["scheduler"], positive, negative, latent, denoise=wf["denoise1"])[0]
    stage2 = nodes.KSampler().sample(branch["branch2"], wf["seed2"], s["steps"], s["cfg"], s["sampler_name"],
                                     s["scheduler"], positive, negative, stage1, denoise=wf["denoise2"])[0]
    return stage1["samples"], stage2["samples"]


def scenario_executor(rec, params):
    """``params["prompts"]``: [{"prompt": API prompt, "workflow": its parameters}], queued in order on one
    executor. Records per prompt its outputs, cache hits and executed nodes; the base model (``UNETLoader``
    node ``params["base_node"]``) from the cache after every prompt vs a fresh load; the stage latents of
    each distinct workflow run by hand (tensors ``hand<i>.stage1`` / ``hand<i>.stage2``)."""
    import comfy.model_management as mm
    import execution
    import nodes
    S._setup_folders(params)
    nodes.NODE_CLASS_MAPPINGS.update(workflow_nodes.NODE_CLASS_MAPPINGS)
    server = StubServer()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.RAM_PRESSURE,
                                        cache_args=_cache_args())
    rec.result["prompts"], base_ids = [], []
    for i, item in enumerate(params["prompts"]):
        prompt_id = f"workflow-{i}"
        with rec.step(f"prompt {i}"):
            valid = asyncio.run(execution.validate_prompt(prompt_id, item["prompt"], None))
            if not valid[0]:
                raise RuntimeError(f"invalid prompt: {valid[1]} {valid[3]}")
            executor.execute(item["prompt"], prompt_id, {"client_id": "workflow-test"}, valid[2])
            rec.result["prompts"].append({"success": executor.success, "outputs": executor.history_result["outputs"],
                                          **_summary(server, prompt_id)})
            base = _cached_output(executor, params["base_node"])
            base_ids.append(None if base is None else id(base.model))
    rec.result["base_model_reused"] = len(set(base_ids)) == 1 and None not in base_ids
    with rec.step("base weights"):
        base = _cached_output(executor, params["base_node"])
        dm = base.model.diffusion_model
        fresh = S._state_dict_copy(S._load_unet(params["prompts"][0]["workflow"]["unet"]).model.diffusion_model)
        rec.result["int4_layers"] = sorted(S._int4_modules(dm))
        rec.result["base_as_cached"] = S._compare_state_dicts(fresh, S._state_dict_copy(dm))
        mm.load_models_gpu([base])  # what a next prompt sampling with the base model does
        rec.result["base_loaded"] = S._compare_state_dicts(fresh, S._state_dict_copy(dm))
        mm.unload_all_models()
        rec.result["base_unloaded"] = S._compare_state_dicts(fresh, S._state_dict_copy(dm))
        del base, dm, fresh
    for i, item in enumerate(params["prompts"]):
        with rec.step(f"by hand {i}"):
            stage1, stage2 = by_hand(item["workflow"])
            rec.put(f"hand{i}.stage1", stage1)
            rec.put(f"hand{i}.stage2", stage2)
            mm.unload_all_models()


SCENARIOS = {"executor": scenario_executor}


def main(argv):
    return S.run_scenario(argv, SCENARIOS)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

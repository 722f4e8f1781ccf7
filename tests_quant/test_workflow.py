"""A ComfyUI workflow on the int4 Qwen-Image model with LoRAs, run the way ComfyUI runs it (issue 16, item 7).

The workflow (API format, as the frontend posts it to ``/prompt``)::

    UNETLoader (int4) ─┬─ LoraLoaderModelOnly A ──────────────────────────── KSampler stage 1 ─┬─ SaveLatent
                       └─ LoraLoaderModelOnly B ── LoraLoaderModelOnly C|D ── KSampler stage 2 ─┴─ SaveLatent
                                                                  (stage 2 denoises stage 1's latent, denoise 0.6)

Conditioning comes from a test-only node (``workflow_nodes.Int4TestConditioning``, seeded), the latent from
``EmptyLatentImage``. It is queued TWICE on one executor, branch 2's last LoRA C swapped for D in between:
the second prompt must take the base model, branch 1 and stage 1 from the cache and rerun only branch 2's
LoRA chain onward, without anything of LoRA C (the stale-cache bug custom int4 nodes had in multi-stage
workflows).

* ``test_workflow_prompt_executor``: upstream's ``execution.PromptExecutor`` in a scenario subprocess
  (``workflow_scenarios.py``), made as ``main.py`` makes it (default RAM-pressure cache) and fed prompts
  validated by ``execution.validate_prompt`` as ``POST /prompt`` does.
* ``test_workflow_server``: ``python main.py --cpu --listen 127.0.0.1 --port <free>`` in the patched copy,
  the two prompts queued with ``POST /prompt``, results read from ``GET /history/<id>``, server stopped.
  Skipped, saying so, where the server's own packages (aiohttp, yarl, SQLAlchemy) are not installed.

Expectation: the same nodes called one by one in Python (``workflow_scenarios.by_hand``: ``UNETLoader().
load_unet``, ``LoraLoaderModelOnly().load_lora_model_only``, ``KSampler().sample``), in the executor's
subprocess. Tolerance: none. Every latent must be BIT-IDENTICAL to the by-hand one: both runs execute the
same node code on the same CPU with one intra-op thread (the scenario sets it; the server gets
``OMP_NUM_THREADS=1``), the same seeds and inputs, so the same floating-point operations in the same order.
Any difference is a real divergence (another model, another LoRA, another patch state), not rounding.
(It found one: the executor runs nodes under ``torch.inference_mode``, the by-hand run under ``no_grad``, and
there kitchen's W4A4 linear on ``to_out``'s strided input took an inexact fallback; see test_strided_input.py.)
Negative control: LoRA C's and LoRA D's stage-2 latents differ by far more than nothing (a relative max
difference above ``MIN_LORA_EFFECT``), so "equal to the D run" cannot hold for a run that used C.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import upstream_env as U
from upstream_env import comfyui, models, upstream_source  # noqa: F401 (fixtures)

WORKFLOW_SCENARIOS = U.TESTS_DIR / "workflow_scenarios.py"
NODES_FILE = U.TESTS_DIR / "workflow_nodes.py"
BASE, BRANCH2_LAST, STAGE1, STAGE2, SAVE1, SAVE2 = "1", "21", "50", "51", "60", "61"
MIN_LORA_EFFECT = 1e-2          # C vs D at stage 2: relative max difference at least this
SERVER_START_S = 240            # bounded waits for the real server (2 shared CPU cores)
SERVER_PROMPT_S = 300
LORA_C, LORA_D = "lora_c_kohya.safetensors", "lora-d-diffusers.safetensors"


# ------------------------------------------------------------------------------------ the workflow
def workflow(models, last_lora) -> dict:
    """The workflow's parameters (what ``api_prompt`` turns into a prompt and ``by_hand`` runs)."""
    cfg = U.int4_config()
    return {"unet": models.int4_name,
            "branch1": [[models.loras["A"].name, 1.0]],
            "branch2": [[models.loras["B"].name, 0.8], [last_lora, 1.0]],
            "positive": [1, cfg.text_tokens, cfg.joint_attention_dim],
            "negative": [2, cfg.text_tokens, cfg.joint_attention_dim],
            "width": 8 * cfg.latent_size, "height": 8 * cfg.latent_size,
            "seed1": 42, "seed2": 43, "denoise1": 1.0, "denoise2": 0.6,
            "sampler": {"steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple"}}


def api_prompt(wf) -> dict:
    """The API-format prompt of ``wf``: ``{node_id: {"class_type", "inputs"}}``, links ``[node_id, output]``."""
    p = {BASE: {"class_type": "UNETLoader", "inputs": {"unet_name": wf["unet"], "weight_dtype": "default"}}}
    tips = {}
    for first, branch in ((10, "branch1"), (20, "branch2")):
        model = [BASE, 0]
        for j, (name, strength) in enumerate(wf[branch]):
            p[str(first + j)] = {"class_type": "LoraLoaderModelOnly",
                                 "inputs": {"model": model, "lora_name": name, "strength_model": strength}}
            model = [str(first + j), 0]
        tips[branch] = model
    for nid, key in (("30", "positive"), ("31", "negative")):
        seed, tokens, width = wf[key]
        p[nid] = {"class_type": "Int4TestConditioning", "inputs": {"seed": seed, "tokens": tokens, "width": width}}
    p["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": wf["width"], "height": wf["height"],
                                                            "batch_size": 1}}
    for nid, branch, latent, n in ((STAGE1, "branch1", ["40", 0], "1"), (STAGE2, "branch2", [STAGE1, 0], "2")):
        p[nid] = {"class_type": "KSampler",
                  "inputs": {"model": tips[branch], "seed": wf[f"seed{n}"], **wf["sampler"], "positive": ["30", 0],
                             "negative": ["31", 0], "latent_image": latent, "denoise": wf[f"denoise{n}"]}}
    for nid, stage, prefix in ((SAVE1, STAGE1, "workflow/stage1"), (SAVE2, STAGE2, "workflow/stage2")):
        p[nid] = {"class_type": "SaveLatent", "inputs": {"samples": [stage, 0], "filename_prefix": prefix}}
    return p


def prompts(models) -> list[dict]:
    return [{"workflow": wf, "prompt": api_prompt(wf)} for wf in (workflow(models, LORA_C), workflow(models, LORA_D))]


# ------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def workflow_models(models, tmp_path_factory) -> Path:
    """``models/`` for the workflow: the int4 file and LoRAs A, B (linked from ``models``), and LoRAs C, D
    (same target layers; C Kohya rank 8, D diffusers rank 4, other seeds)."""
    d = tmp_path_factory.mktemp("workflow-models")
    (d / "diffusion_models").mkdir()
    (d / "loras").mkdir()
    (d / "diffusion_models" / models.int4_name).symlink_to(models.path(models.int4_name))
    for lf in models.loras.values():
        (d / "loras" / lf.name).symlink_to(models.dir / "loras" / lf.name)
    layers = models.int4_layers
    shapes = {p: (layers[p][0]["weight"].shape[0], U.in_features(layers[p][0])) for p in U.LORA_TARGETS}
    U.build_lora(d / "loras" / LORA_C, shapes, "kohya", rank=8, alpha=4.0, seed=300)
    U.build_lora(d / "loras" / LORA_D, shapes, "diffusers", rank=4, alpha=4.0, seed=400)
    return d


def read_latent(path: Path) -> torch.Tensor:
    """A ``SaveLatent`` file: safetensors holding ``latent_tensor``."""
    import safetensors.torch
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def saved_file(outputs: dict, node: str, output_dir: Path) -> Path:
    """The file a ``SaveLatent`` node lists in a prompt's history outputs."""
    (item,) = outputs[node]["latents"]
    return output_dir / item["subfolder"] / item["filename"]


def assert_bit_identical(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)} " \
                                                                 f"vs by hand {want.dtype} {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs().max().item()
    assert torch.equal(got, want), f"{what}: not bit-identical to the nodes run by hand (max |diff| {diff:.3g})"


def relative_change(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_latents(outputs: list[dict], output_dir: Path, hand: dict, where: str) -> float:
    """``outputs``: per prompt, its history outputs. Prompt 1 saved both stages; prompt 2 a new stage-2 file
    and, for stage 1, at most prompt 1's file again (a cached output node's UI); each latent equals the
    by-hand run of its own workflow; the negative control. Returns LoRA D's effect on stage 2 (relative)."""
    assert set(outputs[0]) == {SAVE1, SAVE2}, f"{where}: prompt 1 saved {sorted(outputs[0])}"
    assert SAVE2 in outputs[1], f"{where}: prompt 2 saved no stage-2 latent: {outputs[1]}"
    files = [{n: saved_file(o, n, output_dir) for n in o} for o in outputs]
    assert files[1][SAVE2] != files[0][SAVE2], f"{where}: prompt 2 wrote no new stage-2 file"
    assert files[1].get(SAVE1, files[0][SAVE1]) == files[0][SAVE1], f"{where}: prompt 2 ran stage 1 again"
    got = [{n: read_latent(f) for n, f in fs.items()} for fs in files]
    assert_bit_identical(hand["hand1.stage1"], hand["hand0.stage1"], "by hand: stage 1 of both workflows")
    assert_bit_identical(got[0][SAVE1], hand["hand0.stage1"], f"{where}: prompt 1, stage 1 (LoRA A)")
    assert_bit_identical(got[0][SAVE2], hand["hand0.stage2"], f"{where}: prompt 1, stage 2 (LoRA B + C)")
    assert_bit_identical(got[1][SAVE2], hand["hand1.stage2"], f"{where}: prompt 2, stage 2 (LoRA B + D)")
    effect = relative_change(hand["hand1.stage2"], hand["hand0.stage2"])
    assert effect > MIN_LORA_EFFECT, f"negative control: LoRA D vs C changes stage 2 by only {effect:.3g}"
    assert not torch.equal(got[1][SAVE2], hand["hand0.stage2"]), f"{where}: prompt 2 used LoRA C"
    for t in (*got[0].values(), *got[1].values()):
        assert bool(torch.isfinite(t).all()), where
    return effect


# ------------------------------------------------------------------------------------ PromptExecutor
@pytest.fixture(scope="module")
def executor_run(comfyui, models, workflow_models, tmp_path_factory) -> dict:
    """The executor scenario (two prompts, then the by-hand runs), once per patched upstream copy."""
    work = tmp_path_factory.mktemp(f"workflow-executor-{comfyui.rev}")
    r = U.run_script(WORKFLOW_SCENARIOS, comfyui.path, "executor", work, models_dir=workflow_models,
                     prompts=prompts(models), base_node=BASE)
    r["output_dir"] = str(work / "output")
    return r


def test_workflow_prompt_executor(executor_run, models):
    """Both prompts succeed on one ``PromptExecutor``; prompt 2 takes the base model, branch 1 and stage 1
    from the cache (the same model object) and reruns branch 2's last LoRA and stage 2; every saved latent
    is bit-identical to the by-hand run of its workflow (prompt 2's to LoRA D's, not C's); the cached base
    model's state dict (int4 tensors included) is bit-identical to a fresh load's once the base model itself
    is loaded again (as a next prompt sampling with it would) and after every model is unloaded. (Right
    after the prompts it still holds the last clone's LoRA: upstream patches weights while a clone is
    loaded, and this project folds LoRAs on SVDQuant layers into the low-rank factors; that is recorded.)"""
    r = executor_run
    assert not r["errors"], U.format_errors(r["errors"])
    p1, p2 = r["prompts"]
    for i, p in enumerate((p1, p2)):
        assert p["success"] and not p["errors"], f"prompt {i + 1}: {p['errors']}"
    assert {BASE, "10", STAGE1, SAVE1} <= set(p2["cached"]), f"prompt 2 cached only {p2['cached']}"
    assert BASE not in p2["executed"] and STAGE1 not in p2["executed"], p2["executed"]
    assert {BRANCH2_LAST, STAGE2, SAVE2} <= set(p2["executed"]), f"prompt 2 executed only {p2['executed']}"
    assert r["base_model_reused"], "the two prompts did not share one cached base model"

    hand = U.scenario_tensors(r)
    effect = check_latents([p1["outputs"], p2["outputs"]], Path(r["output_dir"]), hand, "PromptExecutor")

    assert len(r["int4_layers"]) == len(models.int4_layers), r["int4_layers"]
    for state in ("base_loaded", "base_unloaded"):
        c = r[state]
        assert c["count"] and not (c["differ"] or c["missing"] or c["added"]), f"{state}: {c}"
    cached = r["base_as_cached"]
    print(f"[workflow executor {r.get('_wall_s')}s] prompt 2 cached {p2['cached']}, executed {p2['executed']}; "
          f"C vs D stage 2 relative change {effect:.3g}; {r['base_loaded']['count']} base tensors bit-identical "
          f"to a fresh load once the base model is loaded again and after unload ({len(cached['differ'])} held "
          f"branch 2's LoRA while its clone was loaded); seconds {r['seconds']}")


# ------------------------------------------------------------------------------------ the real server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, data=None, timeout=10):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def server_skip_reason(copy: Path) -> str | None:
    """``main.py`` imports the server's own packages (aiohttp, yarl; SQLAlchemy for its assets code), which the
    diffusion-path tests do not need."""
    code = "import aiohttp, yarl, sqlalchemy, filelock"
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, env=U._env(copy), capture_output=True, text=True,
                          timeout=120)
    return None if proc.returncode == 0 else f"ComfyUI's server packages are missing: {proc.stderr.strip()[-200:]}"


class Server:
    """``main.py`` on loopback in ``copy``: its base directory holds the models (linked), the test node in
    ``custom_nodes``, input/temp/user folders; an empty web root (no frontend package needed)."""

    def __init__(self, copy: Path, models_dir: Path, work: Path):
        self.base, self.output, self.log_path = work / "base", work / "output", work / "server.log"
        (self.base / "custom_nodes").mkdir(parents=True)
        (self.base / "models").symlink_to(models_dir, target_is_directory=True)
        shutil.copy(NODES_FILE, self.base / "custom_nodes" / NODES_FILE.name)
        (work / "web").mkdir()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "main.py", *U.UPSTREAM_ARGS, "--listen", "127.0.0.1", "--port", str(port),
                    "--base-directory", str(self.base), "--output-directory", str(self.output),
                    "--front-end-root", str(work / "web"), "--database-url", "sqlite:///:memory:",
                    "--disable-api-nodes"]
        self.copy, self.proc = copy, None

    def log_tail(self) -> str:
        return U._tail(self.log_path.read_text(errors="replace")) if self.log_path.is_file() else ""

    def start(self):
        """Launch and wait (bounded) until ``/object_info`` answers; the test node must be registered."""
        env = dict(U._env(self.copy), OMP_NUM_THREADS="1")  # the scenario's one intra-op thread
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.copy, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode} at start:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                if "Int4TestConditioning" not in _http(self.url + "/object_info/Int4TestConditioning"):
                    raise RuntimeError(f"custom node {NODES_FILE.name} not registered:\n{self.log_tail()}")
                return
            time.sleep(0.5)
        raise TimeoutError(f"server not up after {SERVER_START_S}s:\n{self.log_tail()}")

    def queue(self, prompt) -> str:
        try:
            answer = _http(self.url + "/prompt", {"prompt": prompt, "client_id": "workflow-test"})
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST /prompt refused: {e.code} {e.read().decode(errors='replace')}") from None
        assert not answer.get("node_errors"), answer
        return answer["prompt_id"]

    def history(self, prompt_id, deadline) -> dict:
        while time.monotonic() < deadline:
            entry = _http(f"{self.url}/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} not done in {SERVER_PROMPT_S}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def cached_nodes(entry, prompt_id) -> list[str]:
    """The nodes a history entry's ``execution_cached`` message lists."""
    return sorted(n for event, data in entry["status"]["messages"]
                  if event == "execution_cached" and data.get("prompt_id") == prompt_id for n in data["nodes"])


def test_workflow_server(comfyui, models, workflow_models, executor_run, tmp_path):
    """The same two prompts through the real server (``POST /prompt`` twice, ``GET /history/<id>``): both
    succeed, prompt 2 serves the base model and stage 1 from the cache and saves only stage 2, and every
    saved latent is bit-identical to the by-hand run (done in the executor scenario's process: same code,
    same CPU, one thread)."""
    reason = server_skip_reason(comfyui.path)
    if reason:
        pytest.skip(reason)
    server = Server(comfyui.path, workflow_models, tmp_path)
    t0 = time.perf_counter()
    try:
        server.start()
        t_up = time.perf_counter() - t0
        ids = [server.queue(p["prompt"]) for p in prompts(models)]
        deadline = time.monotonic() + SERVER_PROMPT_S
        entries = [server.history(pid, deadline) for pid in ids]
    finally:
        server.stop()
    for pid, entry in zip(ids, entries):
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
    assert {BASE, "10", STAGE1, SAVE1} <= set(cached_nodes(entries[1], ids[1])), entries[1]["status"]
    hand = U.scenario_tensors(executor_run)
    effect = check_latents([e["outputs"] for e in entries], server.output, hand, "server")
    print(f"[workflow server] up in {t_up:.1f}s, total {time.perf_counter() - t0:.1f}s; prompt 2 cached "
          f"{cached_nodes(entries[1], ids[1])}; C vs D stage 2 relative change {effect:.3g}")

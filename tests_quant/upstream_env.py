"""Running this project inside a patched copy of real upstream ComfyUI, for ``test_upstream_comfyui.py``.

* Which upstream: both pinned trees, ``4f874c5`` and ``6db4fa2f``, each made fresh by
  ``<repo root>/../shared/tools/upstream-tree.sh REV DEST`` and run with the comfy-kitchen and comfy-aimdo
  versions ITS OWN ``requirements.txt`` pins: those are installed (``pip install --no-deps --target``, once,
  cached) into ``<repo root>/.upstream-site/<name>-<version>_.../`` (``pinned_site``), which goes first on
  the subprocess's PYTHONPATH. ``upstream_source`` (session fixture) is parametrized over the two trees,
  so every test that uses ``comfyui`` / ``comfyui_unpatched`` runs once per tree, the revision in its id.
  With ``$COMFYUI_PATH`` set: that one tree only (id ``COMFYUI_PATH``), with this Python's own packages.
  Absent → every test that needs it skips, saying so.
* ``comfyui`` (session fixture): a temporary copy of that tree with the project installed
  (``install_project``: ``python -m comfy.quant install-comfyui --patch P`` when this checkout has it, else
  copy ``comfy/quant`` + ``git apply P``; P = ``comfy/quant_tools/upstream/comfyui-<rev>.patch`` where that
  exists, else ``comfyui.patch``), on which upstream's own ``tests-unit/comfy_quant`` is run once.
  ``comfyui_unpatched``: a plain copy. Both are ``ComfyUICopy`` (``.path``, ``.rev``).
* ``run_in_comfyui(copy, scenario, workdir, **params)``: one subprocess running
  ``upstream_scenarios.py`` there (cwd = the copy, PYTHONPATH = the tree's pinned packages + the copy +
  ``tests_quant/stubs``, ``--cpu`` in its argv); returns the scenario's JSON. ``run_script`` does the same
  for another scenario file. Upstream's ``comfy`` and this repository's host ``comfy`` share a name, so
  upstream only ever runs in such subprocesses.
* The files the scenarios load are made here, in the pytest process, with THIS repository's code:
  ``demo.py``'s seeded Qwen-Image model quantized by ``quantizer.py``, a Nunchaku file from
  ``nunchaku_fixtures.py``, LoRA files from ``lora_helpers.py``; expectations are computed here too
  (float64, from the stored tensors: ``reference.py``, ``lora_helpers.py``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
STUBS_DIR = TESTS_DIR / "stubs"
SCENARIOS = TESTS_DIR / "upstream_scenarios.py"
PATCH = REPO_ROOT / "comfy" / "quant_tools" / "upstream" / "comfyui.patch"
SHARED = REPO_ROOT.parent / "shared"
TREE_SCRIPT = SHARED / "tools" / "upstream-tree.sh"
REVISIONS = ("4f874c5", "6db4fa2f")      # the pinned upstream trees (../shared/upstream/README.md)
PINNED = ("comfy-kitchen", "comfy-aimdo")  # installed per tree, at the version its requirements.txt pins
SITE_ROOT = REPO_ROOT / ".upstream-site"
PIP_TIMEOUT_S = 900
UPSTREAM_ARGS = ("--cpu",)
SCENARIO_TIMEOUT_S = 300
UNIT_TESTS = "tests-unit/comfy_quant"


# ------------------------------------------------------------------------------------ locations
def upstream_tree() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    return Path(env).expanduser().resolve() if env else (SHARED / "upstream" / "ComfyUI").resolve()


def upstream_skip_reason() -> str | None:
    tree = upstream_tree()
    if not (tree / "nodes.py").is_file() or not (tree / "comfy").is_dir():
        how = "$COMFYUI_PATH" if os.environ.get("COMFYUI_PATH") else "default location (set $COMFYUI_PATH)"
        return f"upstream ComfyUI not found at {tree} ({how})"
    if not os.environ.get("COMFYUI_PATH") and not TREE_SCRIPT.is_file():
        return f"{TREE_SCRIPT} not found (it makes the pinned upstream trees)"
    return None


def copy_upstream(dest: Path, source: Path | None = None) -> Path:
    """A private copy of an upstream tree (~29 MB; default ``upstream_tree()``) that tests may patch and write into."""
    shutil.copytree(source or upstream_tree(), dest, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def make_tree(rev: str, dest: Path) -> Path:
    """A fresh writable upstream tree at ``rev`` (``../shared/tools/upstream-tree.sh``)."""
    proc = subprocess.run(["bash", str(TREE_SCRIPT), rev, str(dest)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{TREE_SCRIPT.name} {rev} {dest} failed ({proc.returncode}):\n{proc.stderr}")
    return dest


def tree_pins(tree: Path) -> dict[str, str]:
    """``{package: version}`` of the ``PINNED`` packages in ``tree``'s requirements.txt (``name==version`` lines)."""
    pins = {}
    for line in (tree / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower() in PINNED:
            pins[name.strip().lower()] = version.strip()
    missing = sorted(set(PINNED) - set(pins))
    if missing:
        raise RuntimeError(f"{tree / 'requirements.txt'}: no '==' pin for {', '.join(missing)}")
    return pins


def pinned_site(pins: dict[str, str]) -> Path:
    """A folder holding exactly ``pins`` (``pip install --no-deps --target``), made once and reused.

    ``--no-deps``: comfy-kitchen and comfy-aimdo need nothing at run time but torch, which stays this
    Python's. Built under a temporary name and renamed, so an interrupted install is never reused."""
    site = SITE_ROOT / "_".join(f"{name}-{version}" for name, version in sorted(pins.items()))
    if site.is_dir():
        return site
    tmp = site.with_name(f"{site.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(tmp), *(f"{name}=={version}" for name, version in sorted(pins.items()))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{_tail(proc.stderr)}")
    try:
        tmp.rename(site)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return site


def patch_for(rev: str) -> Path:
    """The patch for upstream ``rev``: ``comfyui-<rev>.patch`` next to ``comfyui.patch`` where it exists."""
    own = PATCH.with_name(f"comfyui-{rev}.patch")
    return own if own.is_file() else PATCH


# ------------------------------------------------------------------------------------ install
def _installer_available() -> bool:
    proc = subprocess.run([sys.executable, "-m", "comfy.quant", "install-comfyui", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0


def install_project(copy: Path, patch: Path = PATCH) -> str:
    """Install this checkout's ``comfy/quant`` and ``patch`` into ``copy``; returns how it was done.

    The one switch point: the project's installer when present, else the same two steps by hand."""
    if _installer_available():
        proc = subprocess.run([sys.executable, "-m", "comfy.quant", "install-comfyui", str(copy),
                               "--patch", str(patch)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"install-comfyui {copy} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return "python -m comfy.quant install-comfyui: " + (proc.stdout.strip() or proc.stderr.strip())
    shutil.copytree(REPO_ROOT / "comfy" / "quant", copy / "comfy" / "quant",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # never let git find a repository above the copy (it would resolve the patch's paths there)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(copy.parent))
    proc = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"git apply {patch} in {copy} failed:\n{proc.stderr}")
    return "copied comfy/quant and ran git apply"


# copy (resolved) -> the folder with its tree's pinned packages; a copy not here runs on this Python's own
_SITES: dict[Path, Path] = {}


def _env(copy: Path) -> dict:
    """PYTHONPATH = the tree's pinned packages (if any), the copy, the stand-ins, then any existing entries
    that cannot shadow upstream."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() not in (REPO_ROOT, TESTS_DIR)]
    site = _SITES.get(Path(copy).resolve())
    first = [str(site)] if site else []
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*first, str(copy), str(STUBS_DIR), *keep]),
                PYTHONDONTWRITEBYTECODE="1")


@dataclass
class UnitTestRun:
    returncode: int
    summary: str
    output_tail: str


def run_upstream_unit_tests(copy: Path) -> UnitTestRun:
    """Upstream's own ``tests-unit/comfy_quant`` (unittest style, collected by pytest) in the copy."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", UNIT_TESTS],
                          cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return UnitTestRun(proc.returncode, out[-1] if out else "", "\n".join(out[-40:]))


# ------------------------------------------------------------------------------------ runner
class ScenarioError(RuntimeError):
    pass


def _tail(text: str, lines=60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_in_comfyui(copy, scenario_name, workdir, timeout=SCENARIO_TIMEOUT_S, **params) -> dict:
    """Run one scenario of ``upstream_scenarios.py`` in the ComfyUI at ``copy``; its JSON result (``run_script``)."""
    return run_script(SCENARIOS, copy, scenario_name, workdir, timeout, **params)


def run_script(script, copy, scenario_name, workdir, timeout=SCENARIO_TIMEOUT_S, **params) -> dict:
    """Run one scenario of the scenario file ``script`` in the ComfyUI at ``copy``; its JSON result.

    ``params`` go to the scenario as JSON (paths as strings), with ``workdir``, ``result`` (the JSON it
    writes) and ``tensors`` (the safetensors it may write) added. Raises ScenarioError with the
    subprocess's stderr tail when it fails, times out or writes no result. The result carries
    ``_wall_s`` (the subprocess's wall time) and ``_stderr_tail``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / f"{scenario_name}.json"
    result_path.unlink(missing_ok=True)
    params = {"workdir": str(workdir), "result": str(result_path),
              "tensors": str(workdir / f"{scenario_name}.safetensors"), **params}
    cmd = [sys.executable, str(script), scenario_name, json.dumps(params, default=str), "--", *UPSTREAM_ARGS]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(Path(copy)), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise ScenarioError(f"scenario {scenario_name!r} timed out after {timeout}s; stderr tail:\n"
                            f"{_tail(err)}") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.is_file():
        raise ScenarioError(f"scenario {scenario_name!r} exited {proc.returncode} in {copy}; stderr tail:\n"
                            f"{_tail(proc.stderr)}")
    result = json.loads(result_path.read_text())
    result["_wall_s"] = round(wall, 2)
    result["_stderr_tail"] = _tail(proc.stderr, 30)
    return result


def scenario_tensors(result) -> dict[str, torch.Tensor]:
    import safetensors.torch
    return safetensors.torch.load_file(result["tensors"]) if result.get("tensors") else {}


def step_errors(result, *prefixes) -> dict[str, str]:
    """The failed steps of a scenario result (those starting with one of ``prefixes``; all if none)."""
    return {k: v for k, v in result["errors"].items() if not prefixes or k.startswith(prefixes)}


def format_errors(errors: dict[str, str]) -> str:
    return "\n".join(f"--- step {k!r}:\n{v}" for k, v in errors.items())


# ------------------------------------------------------------------------------------ test files
def int4_config():
    """demo.py's model at 2 blocks: dim 256 (2 heads x 128, RoPE 16/56/56), text dim 256, rank 32; latent 8x8."""
    from comfy.quant_tools.demo import DemoConfig
    return DemoConfig(num_layers=2, latent_size=8, text_tokens=8)


def build_int4_qwen_image(path: Path, cfg=None) -> None:
    """demo.py's seeded bf16 Qwen-Image model, calibrated on two seeded inputs, quantized by quantize_file."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    from comfy.quant_tools.demo import demo_inputs, model_kwargs, synthetic_state_dict
    from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file, record_activation_stats

    cfg = cfg or int4_config()
    sd = synthetic_state_dict(cfg)
    bf16_path = path.with_name(path.stem + "-bf16.safetensors")
    comfy.utils.save_torch_file(sd, str(bf16_path))
    ref = QwenImageTransformer2DModel(**model_kwargs(cfg), operations=comfy.ops.disable_weight_init,
                                      dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    calib = [demo_inputs(cfg, seed=s) for s in (11, 12)]
    with torch.no_grad():
        stats = record_activation_stats(ref, lambda: [ref(*i) for i in calib])
    quantize_file(str(bf16_path), str(path), QuantizeOptions(rank=cfg.rank), calibration=stats, progress=False)
    bf16_path.unlink()


def build_nunchaku(path: Path, seed=0):
    """A tiny Nunchaku Qwen-Image file (nunchaku_fixtures); returns its natural tensors."""
    import nunchaku_fixtures as F
    from safetensors.torch import save_file
    nat = F.make_natural(seed=seed)
    sd, meta = F.to_nunchaku(nat)
    save_file(sd, str(path), metadata=meta)
    return nat


@dataclass
class LoraFile:
    name: str
    rank: int
    alpha: float
    factors: dict  # module path -> (up (N, r), down (r, K)): the values as stored (bf16)

    def scale(self, strength):
        return strength * self.alpha / self.rank


def build_lora(path: Path, shapes: dict, style="diffusers", rank=4, alpha=2.0, seed=0) -> LoraFile:
    """A LoRA file with one pair per module path (``shapes``: path -> (N, K)) in naming ``style``.
    Factors are stored in bf16 (as real LoRAs are), and the expectations use exactly those values."""
    import lora_helpers as H
    from safetensors.torch import save_file
    sd, factors = {}, {}
    for i, (p, (n, k)) in enumerate(sorted(shapes.items())):
        up, down = H.factors(n, k, rank, seed + 31 * i)
        up, down = up.to(torch.bfloat16), down.to(torch.bfloat16)
        sd.update(H.lora_sd(style, p, up, down, alpha))
        factors[p] = (up, down)
    save_file(sd, str(path))
    return LoraFile(path.name, rank, alpha, factors)


def decode_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def file_layers(path) -> dict:
    """{layer: (tensors without the layer prefix, comfy_quant JSON)} of every int4 layer of a native file."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if key.endswith(".comfy_quant"):
            layer = key[:-len(".comfy_quant")]
            t = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".") and k != key}
            out[layer] = (t, decode_json(sd[key]))
    return out


def in_features(tensors) -> int:
    return tensors["weight"].shape[1] * 2  # packed int4: two codes per byte


# ------------------------------------------------------------------------------------ expectations
def int4_reference(x, tensors, conf, dtype):
    """(float64 reference output, Σ|terms|) of an int4 layer from its stored tensors (reference.py)."""
    from reference import awq_forward
    if conf["format"] == "svdquant_w4a4":  # plain or split along K (Flux linear2)
        from arch_fixtures import w4a4_reference
        return w4a4_reference(x, tensors, conf, dtype)
    if conf["format"] == "awq_w4a16":
        return awq_forward(x, tensors, int(conf["group_size"]), tensors.get("bias"))
    raise ValueError(conf)


def accumulation_length(tensors, conf) -> int:
    """Longest fp32 accumulation chain of the layer: K products (+ R of the low-rank branch, SVDQuant)."""
    k = in_features(tensors)
    return k + int(conf.get("rank", 0)) if conf["format"] == "svdquant_w4a4" else k


def worst_ratio(err, tol) -> float:
    return float((err / tol).max())


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as in the scenarios (tiny matrices; same reduction order on both sides)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_layer_outputs(path, xs: dict, dtype) -> dict:
    """This repository's embedded host: ``comfy.sd.load_diffusion_model`` of the same file, each layer
    called on the same input."""
    import comfy.sd
    with one_thread(), torch.no_grad():
        patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
        dm = patcher.model.diffusion_model
        return {p: dm.get_submodule(p)(x) for p, x in xs.items()}


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


# ------------------------------------------------------------------------------------ fixtures
@dataclass
class ComfyUICopy:
    path: Path
    installed: str = ""
    unit_tests: UnitTestRun | None = None
    seconds: dict = field(default_factory=dict)
    rev: str = ""                # "4f874c5", "6db4fa2f", or "COMFYUI_PATH"
    site: Path | None = None     # its tree's pinned comfy-kitchen / comfy-aimdo (None: this Python's own)
    pins: dict = field(default_factory=dict)  # {"comfy-kitchen": version, "comfy-aimdo": version} in ``site``


@dataclass(frozen=True)
class UpstreamSource:
    """One upstream tree to test against: where it is and the packages it runs with."""
    rev: str
    tree: Path
    site: Path | None
    pins: dict


def _source_params() -> list[str]:
    return ["COMFYUI_PATH"] if os.environ.get("COMFYUI_PATH") else list(REVISIONS)


@pytest.fixture(scope="session", params=_source_params())
def upstream_source(request, tmp_path_factory) -> UpstreamSource:
    """A pristine upstream tree per revision (its pinned packages installed), or ``$COMFYUI_PATH`` as it is."""
    reason = upstream_skip_reason()
    if reason:
        pytest.skip(reason)
    rev = request.param
    if rev == "COMFYUI_PATH":
        return UpstreamSource(rev, upstream_tree(), None, {})
    tree = make_tree(rev, tmp_path_factory.mktemp(f"upstream-{rev}") / "ComfyUI")
    pins = tree_pins(tree)
    return UpstreamSource(rev, tree, pinned_site(pins), pins)


def _copy(source: UpstreamSource, dest: Path) -> ComfyUICopy:
    t0 = time.perf_counter()
    copy = copy_upstream(dest, source.tree)
    if source.site:
        _SITES[copy.resolve()] = source.site
    return ComfyUICopy(copy, rev=source.rev, site=source.site, pins=dict(source.pins),
                       seconds={"copy": time.perf_counter() - t0})


@pytest.fixture(scope="session")
def comfyui_unpatched(upstream_source, tmp_path_factory) -> ComfyUICopy:
    return _copy(upstream_source, tmp_path_factory.mktemp(f"upstream-plain-{upstream_source.rev}") / "ComfyUI")


@pytest.fixture(scope="session")
def comfyui(upstream_source, tmp_path_factory) -> ComfyUICopy:
    """A copy of upstream with this project installed, and upstream's own comfy_quant unit tests run there."""
    patch = patch_for(upstream_source.rev)
    if not patch.is_file():
        pytest.skip(f"the upstream patch {patch.relative_to(REPO_ROOT)} does not exist yet")
    c = _copy(upstream_source, tmp_path_factory.mktemp(f"upstream-patched-{upstream_source.rev}") / "ComfyUI")
    t1 = time.perf_counter()
    c.installed = install_project(c.path, patch)
    t2 = time.perf_counter()
    c.unit_tests = run_upstream_unit_tests(c.path)
    c.seconds.update({"install": t2 - t1, "unit tests": time.perf_counter() - t2})
    return c


@dataclass
class Models:
    """The files the scenarios load, under ``dir/diffusion_models`` and ``dir/loras``, and what they hold."""
    dir: Path
    int4_name: str
    int4_layers: dict            # layer -> (stored tensors, JSON), read back from the file
    nunchaku_name: str
    nunchaku_natural: dict       # nunchaku_fixtures natural tensors
    nunchaku_layers: dict        # layer -> (native tensors, JSON) that the file must convert to
    loras: dict                  # "A", "B" -> LoraFile (on the int4 file)

    def path(self, name):
        return self.dir / "diffusion_models" / name


LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
                "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.1.img_mod.1")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    import nunchaku_fixtures as F
    d = tmp_path_factory.mktemp("upstream-models")
    (d / "diffusion_models").mkdir()
    (d / "loras").mkdir()
    int4_name = "qwen-image-tiny-int4.safetensors"
    build_int4_qwen_image(d / "diffusion_models" / int4_name)
    int4 = file_layers(d / "diffusion_models" / int4_name)
    nk_name = "svdq-int4_r32-tiny-qwen-image.safetensors"
    nat = build_nunchaku(d / "diffusion_models" / nk_name)
    shapes = {p: (int4[p][0]["weight"].shape[0], in_features(int4[p][0])) for p in LORA_TARGETS}
    loras = {"A": build_lora(d / "loras" / "lora-a-diffusers.safetensors", shapes, "diffusers", rank=4, alpha=2.0,
                             seed=100),
             "B": build_lora(d / "loras" / "lora_b_kohya.safetensors", shapes, "kohya", rank=8, alpha=8.0, seed=200)}
    return Models(d, int4_name, int4, nk_name, nat, F.native_layers(nat), loras)


def main(argv) -> int:
    """``python3 tests_quant/upstream_env.py pins``: install every pinned tree's packages ahead of time (the
    fixtures otherwise do it on first use, e.g. to prepare a machine before it goes offline); one line per tree."""
    import tempfile
    if argv[1:] != ["pins"]:
        print(main.__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for rev in REVISIONS:
            pins = tree_pins(make_tree(rev, Path(tmp) / rev))
            print(f"{rev}: {pinned_site(pins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

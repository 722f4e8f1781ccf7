"""``install-comfyui`` on real upstream trees in git, through ComfyUI's own updater; the tools against an
installed ComfyUI.

An "origin" repository stands in for ComfyUI's GitHub: master = 4f874c5, then 6db4fa2f as the next commit
(``../shared/tools/upstream-tree.sh`` makes both trees). A user's clone at 4f874c5 gets the project installed;
then ComfyUI's portable updater (``.ci/update_windows/update.py``, run for real where ``pygit2`` is
importable, else its two git steps by hand: ``git stash`` of tracked changes as ``comfyui``, then a
fast-forward to origin/master) takes the patch out, ``--check`` says so in one line with exit status 4,
``install-comfyui`` puts it back, and ``UNETLoader`` loads an int4 file there (with the packages that tree
pins), each layer matching the float64 reference from the stored tensors. Also: ComfyUI-Manager's refused
``git pull``, a 3-way merge where upstream moved the context, a refusal naming the supported range, and
``python -m comfy.quant`` inside / ``lora-check --comfyui`` against an installed ComfyUI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy.quant_tools.install as inst
import upstream_env as U
from comfy.quant_tools.install import SUPPORTED, describe_tree, patch_files, shipped_patches

UPDATER = U.upstream_tree() / ".ci" / "update_windows" / "update.py"
REVS = ("4f874c5", "6db4fa2f")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}

pytestmark = pytest.mark.skipif(not U.TREE_SCRIPT.is_file() or U.upstream_skip_reason() is not None,
                                reason=U.upstream_skip_reason() or f"{U.TREE_SCRIPT} not found")


def git(cwd, *args, check=True, who="t") -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "GIT_CEILING_DIRECTORIES": str(Path(cwd).parent), "GIT_AUTHOR_NAME": who,
           "GIT_COMMITTER_NAME": who}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=check, capture_output=True, text=True)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfy.quant", "install-comfyui", *map(str, args)], cwd=U.REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def upstream(rev: str, dest: Path) -> Path:
    return U.make_tree(rev, dest)


@pytest.fixture(scope="module")
def origins(tmp_path_factory) -> dict[str, Path]:
    """{"4f874c5": a repository whose master is 4f874c5, "6db4fa2f": its clone with 6db4fa2f committed on top}."""
    base = tmp_path_factory.mktemp("origins")
    old = upstream(REVS[0], base / "old" / "ComfyUI")
    git(old, "init", "-q", "-b", "master")
    git(old, "add", "-A")
    git(old, "commit", "-q", "-m", REVS[0])
    new = base / "new" / "ComfyUI"
    git(base, "clone", "-q", str(old), str(new))
    tree = upstream(REVS[1], base / "tree-6db4fa2f")
    git(new, f"--work-tree={tree}", "add", "-A")  # the 6db4fa2f tree as the next commit
    git(new, "commit", "-q", "-m", REVS[1])
    git(new, "reset", "-q", "--hard")
    shutil.rmtree(tree)
    return {REVS[0]: old, REVS[1]: new}


def clone_at_4f874c5(origin: Path, dest: Path) -> Path:
    git(dest.parent, "clone", "-q", str(origin), str(dest))
    git(dest, "reset", "-q", "--hard", f":/{REVS[0]}")
    return dest


def run_updater(root: Path, workdir: Path) -> str:
    """ComfyUI's portable updater on ``root``: the real script where pygit2 is there, else its git steps."""
    try:
        import pygit2  # noqa: F401
    except ImportError:
        git(root, "stash", who="comfyui")  # tracked files only, as pygit2's Repository.stash(ident)
        git(root, "pull", "-q", "--ff-only")
        return "git stash + git pull --ff-only"
    portable = workdir / "update"
    portable.mkdir()
    shutil.copy(UPDATER, portable / "update.py")
    # the portable's own copy of requirements.txt, equal to the new tree's: the updater skips its pip install
    (portable / "current_requirements.txt").write_text(git(root, "show", "origin/master:requirements.txt").stdout)
    proc = subprocess.run([sys.executable, str(portable / "update.py"), str(root), "--skip_self_update"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "stashing current changes" in proc.stdout, proc.stdout + proc.stderr
    return "update.py"


def tree_snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts}


@pytest.mark.parametrize("target", REVS, ids=["update-to-same-4f874c5", "update-to-6db4fa2f"])
def test_updater_stashes_the_patch_check_says_so_install_puts_it_back(origins, tmp_path, target):
    root = clone_at_4f874c5(origins[target], tmp_path / "ComfyUI")
    assert describe_tree(root) == "ComfyUI 0.29.0 (4f874c5)"
    r = cli(root)
    assert r.returncode == 0 and r.stdout.startswith(f"{root}: installed (patch applied"), r.stdout + r.stderr
    assert cli(root, "--check").returncode == 0

    how = run_updater(root, tmp_path)
    assert git(root, "log", "-1", "--format=%s").stdout.strip() == target, how
    assert (root / "comfy" / "quant" / "INSTALLED_FROM").is_file()  # untracked: the stash left the package
    assert git(root, "status", "--porcelain", "--untracked-files=no").stdout == ""  # the patch is in the stash

    r = cli(root, "--check")
    lines = r.stdout.splitlines()
    assert r.returncode == 4 and len(lines) == 1 and r.stderr == "", r.stdout + r.stderr
    assert lines[0].startswith(f"{root}: the int4 patch is not applied (the package is there): ComfyUI's updater "
                               "stashed it"), lines[0]
    assert f"install-comfyui {root}" in lines[0]

    r = cli(root)
    assert r.returncode == 0 and "installed (patch" in r.stdout, r.stdout + r.stderr
    r = cli(root, "--check")
    assert (r.returncode, r.stdout) == (0, f"{root}: installed and current\n"), r.stdout + r.stderr
    changed = {line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=all").stdout.splitlines()}
    assert {p for p in changed if not p.startswith("comfy/quant/")} == set(patch_files(shipped_patches()[0].read_bytes()))
    _load_int4_in(root, tmp_path)


def test_git_pull_refused_check_says_why_and_the_sequence_works(origins, tmp_path):
    """ComfyUI-Manager's ``git pull`` refuses to overwrite the patched files: ``--check`` names them and says
    what to run; uninstall, pull, install puts the project on the new tree."""
    root = clone_at_4f874c5(origins[REVS[1]], tmp_path / "ComfyUI")
    assert cli(root).returncode == 0
    pull = git(root, "pull", "--ff-only", check=False)
    assert pull.returncode != 0 and "would be overwritten" in pull.stderr, pull.stderr
    r = cli(root, "--check")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stdout + r.stderr
    assert "`git pull` refuses the ComfyUI update while the patch is in (" in r.stdout and "--uninstall" in r.stdout
    assert cli(root, "--uninstall").returncode == 0
    assert git(root, "status", "--porcelain").stdout == ""
    git(root, "pull", "-q", "--ff-only")
    assert describe_tree(root) == "ComfyUI 0.30.0 (6db4fa2f)"
    r = cli(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli(root, "--check").stdout == f"{root}: installed and current\n"


def _context_line(patch: bytes, rel: str) -> str:
    """The first non-blank context line of the patch's first hunk in ``rel``."""
    part = next(p for name, p in inst._sections(patch) if name == rel).decode()
    hunk = part.split("\n@@", 1)[1].split("\n", 1)[1]
    return next(line[1:] for line in hunk.splitlines() if line.startswith(" ") and line.strip())


def test_three_way_merge_on_a_real_tree_where_upstream_moved_the_context(origins, tmp_path):
    """6db4fa2f plus an upstream-like commit that edits a line of the context of the patch's first
    ``comfy/ops.py`` hunk: ``git apply`` refuses, the 3-way merge (from the blobs in the history) goes in;
    uninstall gives the commit back byte for byte."""
    root = clone_at_4f874c5(origins[REVS[1]], tmp_path / "ComfyUI")
    git(root, "reset", "-q", "--hard", "origin/master")
    patch = shipped_patches()[0].read_bytes()
    line = _context_line(patch, "comfy/ops.py")
    ops = root / "comfy" / "ops.py"
    assert ops.read_text().count(line + "\n") == 1, line
    ops.write_text(ops.read_text().replace(line + "\n", line + "  # upstream moved on\n"))
    git(root, "commit", "-q", "-am", "upstream 0.30.1")
    before = tree_snapshot(root)
    assert git(root, "apply", "--check", str(shipped_patches()[0]), check=False).returncode != 0
    r = cli(root)
    assert (r.returncode, r.stdout) == (0, f"{root}: installed (patch merged 3-way into ComfyUI 0.30.0 (6db4fa2f), "
                                           "package copied)\n"), r.stdout + r.stderr
    assert line + "  # upstream moved on\n" in ops.read_text() and "comfy.quant" in ops.read_text()
    assert git(root, "diff", "--cached", "--name-only").stdout == ""  # the user's index untouched
    assert cli(root, "--check").stdout == f"{root}: installed and current\n"
    assert cli(root, "--uninstall").returncode == 0
    assert tree_snapshot(root) == before


def test_unsupported_tree_refused_in_one_line_naming_the_range(tmp_path):
    """A tree whose patched files are not any supported upstream's (plain folder, no git to merge from):
    one line naming the tree and the supported range, exit 2, not a byte changed."""
    root = upstream(REVS[0], tmp_path / "ComfyUI")
    (root / "comfyui_version.py").write_text('__version__ = "0.99.0"\n')
    ops = root / "comfy" / "ops.py"
    ops.write_text(ops.read_text().replace("\n", "\n\n"))  # every hunk's context gone
    before = tree_snapshot(root)
    r = cli(root)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {root}: patch does not apply to ComfyUI 0.99.0 (not a tested version) (")
    assert lines[0].endswith(f"; supported: {SUPPORTED}") and "comfy/ops.py" in lines[0]
    assert SUPPORTED == "ComfyUI 0.29.0 (4f874c5, 2026-07-29) to 0.30.0 (6db4fa2f, 2026-08-07)"
    assert cli(root, "--check").returncode == 5
    assert tree_snapshot(root) == before


def _load_int4_in(root: Path, workdir: Path) -> None:
    """UNETLoader on the tiny int4 Qwen-Image file in ``root``: every int4 layer of the file is there and each
    output is within ``kernel_tolerance`` of the float64 reference from the stored tensors."""
    from reference import kernel_tolerance
    models = workdir / "models"
    (models / "diffusion_models").mkdir(parents=True)
    name = "qwen-image-tiny-int4.safetensors"
    U.build_int4_qwen_image(models / "diffusion_models" / name)
    layers = U.file_layers(models / "diffusion_models" / name)
    import lora_helpers as H
    inputs = {f"int4:{p}": H.rand_input((2, 5, U.in_features(t)), torch.float32, 1000 + 17 * i,
                                        gelu=bool(c.get("act_unsigned")))  # GELU-shaped where quantized unsigned
              for i, (p, (t, c)) in enumerate(sorted(layers.items()))}
    import safetensors.torch
    safetensors.torch.save_file(inputs, str(workdir / "inputs.safetensors"))
    # the packages the tree's requirements.txt pins (the updater pip-installs them): a private hook of upstream_env
    U._SITES[root.resolve()] = U.pinned_site(U.tree_pins(root))
    r = U.run_in_comfyui(root, "load", workdir / "run", models_dir=models, inputs=workdir / "inputs.safetensors",
                         files={"int4": name})
    assert not r["errors"], U.format_errors(r["errors"])
    assert set(r["files"]["int4"]["layers"]) == set(layers)
    got = U.scenario_tensors(r)
    dtype = U.dtype_from_name(r["files"]["int4"]["dtype"])
    for p, (t, conf) in layers.items():
        x, y = got[f"x.int4:{p}"], got[f"y.int4:{p}"]
        ref, mag = U.int4_reference(x, t, conf, dtype)
        tol = kernel_tolerance(mag, dtype, U.accumulation_length(t, conf))
        err = (y.double() - ref).abs()
        assert bool((err <= tol).all()), f"{p}: err/tol {U.worst_ratio(err, tol):.3f}"


# --- the tools against an installed ComfyUI -----------------------------------------------------------

COMMANDS = ("inspect", "lora-check", "convert-nunchaku", "quantize", "bench", "demo", "install-comfyui")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = upstream(REVS[0], tmp_path_factory.mktemp("installed") / "ComfyUI")
    r = cli(root)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def tools(cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(U.STUBS_DIR), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "comfy.quant", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_installed_runtime_carries_no_tools_and_says_so_in_one_line(installed):
    """The installed package is the run-time package (plus the applied patch and the marker): ``python -m
    comfy.quant <command>`` inside that ComfyUI says in one line that the tools are not there."""
    dest = installed / "comfy" / "quant"
    runtime = {p.relative_to(U.REPO_ROOT / "comfy" / "quant").as_posix()
               for p in (U.REPO_ROOT / "comfy" / "quant").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == \
        runtime | {"INSTALLED_FROM", "upstream/comfyui.patch"}
    assert not (installed / "comfy" / "quant_tools").exists()
    for command in COMMANDS:
        r = tools(installed, command, "--help")
        assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, (command, r.stderr)
        assert r.stderr.startswith("error: the int4 tools are not installed in this ComfyUI"), r.stderr


def test_lora_check_with_comfyui_uses_the_installed_comfyui(installed, tmp_path):
    """``lora-check --comfyui PATH`` from this repository loads the model with PATH's ``comfy.sd`` and maps
    the LoRA with PATH's ``comfy.lora`` (the child logs where each package came from): one row per LoRA
    module naming its target weight and how it lands (by the file's format of that layer), the stray key
    listed as not mapped, exit 1 for it."""
    model = tmp_path / "int4.safetensors"
    U.build_int4_qwen_image(model)
    layers = U.file_layers(model)
    shapes = {p: (layers[p][0]["weight"].shape[0], U.in_features(layers[p][0])) for p in U.LORA_TARGETS}
    lora = tmp_path / "lora.safetensors"
    U.build_lora(lora, shapes, "diffusers")
    import safetensors.torch
    sd = safetensors.torch.load_file(str(lora))
    sd["transformer.no_such_module.lora_A.weight"] = torch.zeros(4, 64)
    safetensors.torch.save_file(sd, str(lora))

    r = tools(U.REPO_ROOT, "lora-check", "-v", "--comfyui", installed, model, lora)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert (f"comfy from {installed}/comfy, comfy.quant from {installed}/comfy/quant, comfy.quant_tools from "
            f"{U.REPO_ROOT}/comfy/quant_tools") in r.stderr
    rows = {line.split("  ->  ")[1].split("  [")[0]: line.split("  [", 1)[1] for line in r.stdout.splitlines()
            if "  ->  " in line}
    assert set(rows) == {f"diffusion_model.{p}.weight" for p in U.LORA_TARGETS}, r.stdout
    for p in U.LORA_TARGETS:
        kind = layers[p][1]["format"]
        assert ("low-rank" if kind == "svdquant_w4a4" else "output term") in rows[f"diffusion_model.{p}.weight"]
    assert "6 LoRA modules map (0 rejected); 1 keys did not map" in r.stdout
    assert "NOT MAPPED transformer.no_such_module.lora_A.weight" in r.stdout


def test_comfyui_option_refusals_are_one_line(tmp_path):
    plain = upstream(REVS[0], tmp_path / "ComfyUI")
    r = tools(U.REPO_ROOT, "lora-check", "--comfyui", plain, "m.safetensors", "l.safetensors")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {plain}: not installed (the command needs the project installed there"), r.stderr
    r = tools(U.REPO_ROOT, "demo", "--comfyui", plain)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: demo runs on this repository's embedded host only")

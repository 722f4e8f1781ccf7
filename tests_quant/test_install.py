"""``python -m comfy.quant install-comfyui``: install / check / uninstall against a fake ComfyUI tree.

The fake tree gets its own small patch (the shipped comfyui.patch is for real ComfyUI), passed as ``patch``.
The ``env`` tests run twice: the tree as a git repository, and as a plain folder. Then: the 3-way merge
where upstream moved the context (and its refusals), ComfyUI's updater's ``git stash``, and the table of
what the installer adds to a ComfyUI tree, held to a budget. Real upstream trees: ``test_install_upstream.py``.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import comfy.quant_tools.install as inst
from comfy.quant_tools.install import MARKER, PATCH_IN_PACKAGE, InstallError, State, check, install, uninstall

REPO = Path(__file__).resolve().parents[1]

ORIGINAL = {
    "nodes.py": "import comfy.sd\n\n\nNODE_CLASS_MAPPINGS = {}\n\n\ndef init_extra_nodes():\n    return []\n",
    "comfy/__init__.py": "",
    "comfy/ops.py": "import torch\n\n\nclass disable_weight_init:\n    class Linear(torch.nn.Linear):\n"
                    "        pass\n\n\ndef pick_operations():\n    return disable_weight_init\n",
    "comfy/sd.py": "import comfy.ops\n\n\ndef load_diffusion_model(path):\n    ops = comfy.ops.pick_operations()\n"
                   "    return ops\n",
}
PATCHED = {
    **ORIGINAL,
    "nodes.py": ORIGINAL["nodes.py"].replace("NODE_CLASS_MAPPINGS = {}", "NODE_CLASS_MAPPINGS = {}  # int4 nodes"),
    "comfy/ops.py": ORIGINAL["comfy/ops.py"].replace("    return disable_weight_init\n",
                                                    "    import comfy.quant\n    return disable_weight_init\n"),
    "comfy/quant_hook.py": "HOOKED = True\n",  # a file the patch creates
}


def make_patch(before: dict, after: dict) -> str:
    out = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        out.append(f"diff --git a/{name} b/{name}\n")
        if old is None:
            out.append("new file mode 100644\n")
        out.extend(difflib.unified_diff((old or "").splitlines(True), new.splitlines(True),
                                        "/dev/null" if old is None else f"a/{name}", f"b/{name}"))
    return "".join(out)


def tree_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "GIT_CEILING_DIRECTORIES": str(Path(cwd).parent)})


@pytest.fixture(params=["git-repo", "plain-folder"])
def env(request, tmp_path):
    """(ComfyUI root, patch path, source package) for a fresh fake tree."""
    root = tmp_path / "ComfyUI"
    for name, text in ORIGINAL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if request.param == "git-repo":
        _git(root, "init", "-q")
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", "upstream")
    patch = tmp_path / "fake.patch"
    patch.write_text(make_patch(ORIGINAL, PATCHED))
    # A small stand-in for this package, so tests don't depend on what else is in comfy/quant right now.
    source = tmp_path / "src" / "comfy" / "quant"
    (source / "formats").mkdir(parents=True)
    (source / "__init__.py").write_text('"""int4"""\n')
    (source / "install.py").write_text("X = 1\n")
    (source / "formats" / "base.py").write_text("Y = 2\n")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "install.cpython-312.pyc").write_bytes(b"\0junk")
    (source / "upstream").mkdir()
    (source / "upstream" / "comfyui.patch").write_text("the shipped patch, not the fake one\n")
    return root, patch, source


def read_tree(root: Path) -> dict:
    return {name: (root / name).read_text() for name in PATCHED if (root / name).exists()}


def test_install_applies_patch_and_copies_package(env):
    root, patch, source = env
    out = install(root, patch, source)
    assert out.changed and "installed" in out.action
    assert read_tree(root) == PATCHED
    dest = root / "comfy" / "quant"
    assert (dest / "__init__.py").read_text() == '"""int4"""\n'
    assert (dest / "formats" / "base.py").read_text() == "Y = 2\n"
    assert not (dest / "__pycache__").exists() and not list(dest.rglob("*.pyc"))
    assert (dest / PATCH_IN_PACKAGE).read_bytes() == patch.read_bytes()  # the applied patch, for uninstall
    assert (dest / MARKER).read_text().startswith(inst.MARKER_SIGNATURE)
    assert not list((root / "comfy").glob(".quant-*"))  # no scratch folder left behind
    assert check(root, patch, source).state is State.CURRENT


def test_second_install_is_a_noop(env):
    root, patch, source = env
    install(root, patch, source)
    before = tree_hashes(root)
    out = install(root, patch, source)
    assert out.action == "already installed" and not out.changed
    assert tree_hashes(root) == before


def test_check_states_and_exit_codes(env, capsys):
    from comfy.quant_tools.cli import main

    root, patch, source = env
    argv = ["install-comfyui", str(root), "--check", "--patch", str(patch)]
    before = tree_hashes(root)
    assert check(root, patch, source).state is State.NOT_INSTALLED
    assert main(argv) == 1
    assert capsys.readouterr().out.strip() == f"{root}: not installed"
    assert tree_hashes(root) == before  # --check changes nothing

    install(root, patch, source)
    status = check(root, patch, source)
    assert status.state is State.CURRENT and status.current and status.patch_applied
    assert status.line() == f"{root}: installed and current"

    (source / "install.py").write_text("X = 2\n")  # a newer version of this project
    status = check(root, patch, source)
    assert status.state is State.PACKAGE_OUTDATED and status.package == "outdated" and not status.current

    (root / "comfy" / "ops.py").write_text(ORIGINAL["comfy/ops.py"] + "# local edit\n")  # edited since
    (root / "comfy" / "quant_hook.py").unlink()
    status = check(root, patch, source)
    assert status.state is State.PATCH_DOES_NOT_APPLY and "comfy/" in status.detail


def test_check_via_cli_exit_codes(env, tmp_path):
    root, patch, source = env
    install(root, patch, inst.PACKAGE_DIR)  # the real package, as the CLI installs it
    r = _cli(root, "--check", "--patch", str(patch))
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, f"{root}: installed and current", "")
    r = _cli(tmp_path / "nowhere", "--check", "--patch", str(patch))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such directory"


def _cli(root, *args):
    return subprocess.run([sys.executable, "-m", "comfy.quant", "install-comfyui", str(root), *args],
                          cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("edit", ["edited-file", "other-upstream"])
def test_refusal_when_patch_does_not_apply_changes_nothing(env, edit):
    root, patch, source = env
    if edit == "edited-file":
        (root / "comfy" / "ops.py").write_text(ORIGINAL["comfy/ops.py"].replace("pick_operations", "pick_ops"))
    else:
        (root / "nodes.py").write_text("NODE_CLASS_MAPPINGS = {'x': 1}\n")
    before = tree_hashes(root)
    with pytest.raises(InstallError) as e:
        install(root, patch, source)
    msg = str(e.value)
    assert msg.startswith(f"{root}: patch does not apply")
    assert ("comfy/ops.py" if edit == "edited-file" else "nodes.py") in msg and "\n" not in msg
    assert tree_hashes(root) == before


def test_refusal_on_foreign_comfy_quant(env):
    root, patch, source = env
    foreign = root / "comfy" / "quant"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("# someone else's quant package\n")
    before = tree_hashes(root)
    with pytest.raises(InstallError, match="not ours|no INSTALLED_FROM"):
        install(root, patch, source)
    assert tree_hashes(root) == before
    assert check(root, patch, source).state is State.FOREIGN
    with pytest.raises(InstallError, match="no INSTALLED_FROM"):
        uninstall(root, patch, source)
    assert tree_hashes(root) == before


def test_uninstall_restores_tree_byte_identical(env):
    root, patch, source = env
    before = tree_hashes(root)
    install(root, patch, source)
    # ComfyUI ran in between: caches appear inside the package.
    (root / "comfy" / "quant" / "__pycache__").mkdir()
    (root / "comfy" / "quant" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert check(root, patch, source).state is State.CURRENT
    out = uninstall(root, patch, source)
    assert out.changed and out.action.startswith("uninstalled")
    assert not (root / "comfy" / "quant").exists()
    assert tree_hashes(root) == before
    assert check(root, patch, source).state is State.NOT_INSTALLED


def test_uninstall_uses_the_patch_inside_the_installed_package(env, tmp_path):
    root, patch, source = env
    before = tree_hashes(root)
    install(root, patch, source)
    out = uninstall(root, tmp_path / "no-such.patch", source)  # as from a checkout whose patch is gone
    assert out.changed and tree_hashes(root) == before


def test_uninstall_when_not_installed(env, tmp_path):
    root, patch, source = env
    before = tree_hashes(root)
    out = uninstall(root, patch, source)
    assert out.action == "nothing installed" and not out.changed
    out = uninstall(root, tmp_path / "no-such.patch", source)
    assert out.action == "nothing installed"
    assert tree_hashes(root) == before


def test_uninstall_refuses_when_tree_edited_since(env):
    root, patch, source = env
    install(root, patch, source)
    (root / "comfy" / "ops.py").write_text((root / "comfy" / "ops.py").read_text() + "# edited after install\n")
    (root / "comfy" / "quant_hook.py").unlink()
    before = tree_hashes(root)
    with pytest.raises(InstallError, match="edited since install") as e:
        uninstall(root, patch, source)
    assert "\n" not in str(e.value)
    assert tree_hashes(root) == before


def test_outdated_package_gets_updated(env):
    root, patch, source = env
    install(root, patch, source)
    (root / "comfy" / "quant" / "formats" / "base.py").write_text("Y = 1  # old\n")
    (root / "comfy" / "quant" / "removed_since.py").write_text("")
    (source / "install.py").write_text("X = 3\n")
    patched_files = read_tree(root)
    out = install(root, patch, source)
    assert out.changed and "package files updated" in out.action and "patch already applied" in out.action
    dest = root / "comfy" / "quant"
    assert (dest / "install.py").read_text() == "X = 3\n"
    assert (dest / "formats" / "base.py").read_text() == "Y = 2\n"
    assert not (dest / "removed_since.py").exists()
    assert read_tree(root) == patched_files == PATCHED
    assert check(root, patch, source).state is State.CURRENT


def test_package_present_but_patch_reverted_reinstalls(env):
    root, patch, source = env
    install(root, patch, source)
    for name in PATCHED:  # as after `git checkout .` / `git clean` of the patched files
        if name in ORIGINAL:
            (root / name).write_text(ORIGINAL[name])
        else:
            (root / name).unlink()
    assert check(root, patch, source).state is State.PATCH_NOT_APPLIED
    with pytest.raises(InstallError, match="patch is not applied"):
        uninstall(root, patch, source)
    install(root, patch, source)
    assert check(root, patch, source).state is State.CURRENT and read_tree(root) == PATCHED


def test_newer_patch_over_an_installed_older_one_is_refused(env, tmp_path):
    root, patch, source = env
    install(root, patch, source)
    newer = tmp_path / "newer.patch"
    newer.write_text(make_patch(ORIGINAL, {**PATCHED, "comfy/sd.py": ORIGINAL["comfy/sd.py"] + "# v2\n"}))
    assert check(root, newer, source).state is State.PATCH_OUTDATED
    before = tree_hashes(root)
    with pytest.raises(InstallError, match="uninstall first"):
        install(root, newer, source)
    assert tree_hashes(root) == before
    uninstall(root, newer, source)  # reverses the installed (older) patch
    install(root, newer, source)
    assert check(root, newer, source).state is State.CURRENT


@pytest.mark.parametrize("fail_at", ["copy", "swap"])
def test_failure_midway_rolls_back(env, monkeypatch, fail_at):
    root, patch, source = env
    before = tree_hashes(root)
    if fail_at == "copy":  # disk full while copying the package: before the patch
        real = Path.write_bytes
        calls = []

        def flaky(self, data):
            calls.append(self)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", flaky)
    else:  # the final move fails: after the patch was applied
        real_replace = os.replace

        def flaky_replace(src, dst):
            if Path(dst) == root / "comfy" / "quant":
                raise OSError(13, "Permission denied")
            return real_replace(src, dst)

        monkeypatch.setattr(inst.os, "replace", flaky_replace)
    with pytest.raises(InstallError, match="rolled back"):
        install(root, patch, source)
    assert tree_hashes(root) == before
    assert not list((root / "comfy").glob(".quant-*"))


def test_preflight_refusals(env, tmp_path, monkeypatch):
    root, patch, source = env
    (tmp_path / "notcomfy").mkdir()
    with pytest.raises(InstallError, match="does not look like ComfyUI"):
        install(tmp_path / "notcomfy", patch, source)
    with pytest.raises(InstallError, match="cannot read patch"):
        install(root, tmp_path / "missing.patch", source)
    monkeypatch.setattr(inst.shutil, "which", lambda name: None)
    with pytest.raises(InstallError, match="git not found"):
        check(root, patch, source)


def test_comfyui_inside_another_git_repo(tmp_path):
    """A plain ComfyUI folder inside someone's repository: git must not resolve paths against the outer repo."""
    outer = tmp_path / "outer"
    root = outer / "apps" / "ComfyUI"
    for name, text in ORIGINAL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git(outer, "init", "-q")
    patch = tmp_path / "fake.patch"
    patch.write_text(make_patch(ORIGINAL, PATCHED))
    install(root, patch, inst.PACKAGE_DIR)
    assert read_tree(root) == PATCHED


def test_cli_refusal_prints_one_line_no_traceback(env):
    root, patch, source = env
    (root / "comfy" / "ops.py").write_text("# another upstream version\n")
    before = tree_hashes(root)
    r = _cli(root, "--patch", str(patch))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {root}: patch does not apply") and "comfy/ops.py" in lines[0]
    assert "Traceback" not in r.stderr
    assert tree_hashes(root) == before


def test_cli_install_then_uninstall_one_line_each(env):
    root, patch, source = env
    before = tree_hashes(root)
    for args, expect in [((), "installed (patch applied, package copied)"), ((), "already installed"),
                         (("--uninstall",), "uninstalled (patch reversed, comfy/quant removed)"),
                         (("--uninstall",), "nothing installed")]:
        r = _cli(root, *args, "--patch", str(patch))
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{root}: {expect}\n", ""), r.stderr
    assert tree_hashes(root) == before


# --- recognising the tree; 3-way merge where only context moved ---------------------------------------

def git_patch(tmp: Path, before: dict, after: dict) -> str:
    """``git diff`` from ``before`` to ``after``, with the ``index`` lines naming the pre-image blobs."""
    scratch = tmp / "patch-scratch"
    for name, text in before.items():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        (scratch / name).write_text(text)
    _git(scratch, "init", "-q")
    _git(scratch, "add", "-A")
    _git(scratch, "commit", "-q", "-m", "before")
    for name, text in after.items():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        (scratch / name).write_text(text)
    _git(scratch, "add", "-A")
    return subprocess.run(["git", "diff", "--cached", "--no-color"], cwd=scratch, capture_output=True, text=True,
                          check=True).stdout


# upstream moved on: a line inside the ops.py hunk's context changed (plain apply fails, 3-way merges) ...
MOVED = {**ORIGINAL, "comfy/ops.py": ORIGINAL["comfy/ops.py"].replace("        pass\n\n\n", "        pass\n\n# v2\n")}
# ... or the very line the patch changes did (a conflict)
CONFLICT = {**ORIGINAL, "comfy/ops.py": ORIGINAL["comfy/ops.py"].replace("    return disable_weight_init\n",
                                                                         "    return disable_weight_init  # v2\n")}


def moved_tree(tmp_path, upstream_next: dict, in_git: bool):
    """A fake tree at ORIGINAL (in git: committed), moved on to ``upstream_next`` (in git: the next commit)."""
    root = tmp_path / "ComfyUI"
    for name, text in ORIGINAL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if in_git:
        _git(root, "init", "-q")
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", "upstream")
    for name, text in upstream_next.items():
        (root / name).write_text(text)
    if in_git and upstream_next:
        _git(root, "commit", "-q", "-am", "upstream v2")
    patch = tmp_path / "fake.patch"
    patch.write_text(git_patch(tmp_path, ORIGINAL, PATCHED))
    return root, patch


def test_patch_files_and_made_for(tmp_path):
    root, patch = moved_tree(tmp_path, {}, in_git=False)
    files = inst.patch_files(patch.read_bytes())
    assert set(files) == {"nodes.py", "comfy/ops.py", "comfy/quant_hook.py"} and files["comfy/quant_hook.py"] is None
    assert inst.made_for(root, patch.read_bytes())
    (root / "nodes.py").write_text(ORIGINAL["nodes.py"] + "# edited\n")
    assert not inst.made_for(root, patch.read_bytes())
    assert inst.describe_tree(root) == "ComfyUI of unknown version"
    for version, expect in [("0.29.0", "ComfyUI 0.29.0 (4f874c5)"), ("0.30.0", "ComfyUI 0.30.0 (6db4fa2f)"),
                            ("0.31.1", "ComfyUI 0.31.1 (not a tested version)")]:
        (root / "comfyui_version.py").write_text(f'# generated\n__version__ = "{version}"\n')
        assert inst.describe_tree(root) == expect


def test_three_way_merge_where_only_context_moved(tmp_path):
    root, patch = moved_tree(tmp_path, MOVED, in_git=True)
    source = inst.PACKAGE_DIR
    before = tree_hashes(root)
    assert not subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, capture_output=True).returncode == 0
    out = install(root, patch, source)
    assert out.changed and out.action.startswith("installed (patch merged 3-way into ComfyUI of unknown version")
    expected = {**PATCHED, "comfy/ops.py": PATCHED["comfy/ops.py"].replace("        pass\n\n\n", "        pass\n\n# v2\n")}
    assert read_tree(root) == expected
    assert check(root, patch, source).state is State.CURRENT
    assert subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode == 0  # index untouched
    assert "applied_by: 3-way merge" in (root / "comfy" / "quant" / MARKER).read_text()
    assert install(root, patch, source).action == "already installed"
    uninstall(root, patch, source)  # reverses the merged diff kept in the package
    assert tree_hashes(root) == before


@pytest.mark.parametrize("case", ["conflict-in-git", "moved-plain-folder"])
def test_no_merge_refuses_in_one_line_and_changes_nothing(tmp_path, case):
    root, patch = moved_tree(tmp_path, CONFLICT if case == "conflict-in-git" else MOVED, in_git=case.endswith("git"))
    before = tree_hashes(root)
    with pytest.raises(InstallError) as e:
        install(root, patch, inst.PACKAGE_DIR)
    msg = str(e.value)
    assert msg.startswith(f"{root}: patch does not apply to ComfyUI of unknown version (") and "\n" not in msg
    assert msg.endswith(f"; supported: {inst.SUPPORTED}")
    assert ("3-way merge conflicts in comfy/ops.py" if case == "conflict-in-git" else "not a git checkout") in msg
    assert check(root, patch, inst.PACKAGE_DIR).state is State.PATCH_DOES_NOT_APPLY
    assert tree_hashes(root) == before


def test_failed_merge_write_rolls_back_byte_identical(tmp_path, monkeypatch):
    """A 3-way install that fails while writing the merged files puts every file back."""
    root, patch = moved_tree(tmp_path, MOVED, in_git=True)
    before = tree_hashes(root)
    real = Path.write_bytes

    def flaky(self, data):
        if self.name == "quant_hook.py":  # after ops.py / nodes.py were written
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", flaky)
    with pytest.raises(InstallError, match="rolled back"):
        install(root, patch, inst.PACKAGE_DIR)
    assert tree_hashes(root) == before and not (root / "comfy" / "quant").exists()


def worktree(hashes: dict) -> dict:
    return {k: v for k, v in hashes.items() if not k.startswith(".git/")}


@pytest.mark.parametrize("new_file", ["untracked", "added"])
def test_stash_of_the_patch_is_reported_and_reinstalled(tmp_path, new_file):
    """As ComfyUI's updater does: ``git stash`` (tracked files) as ``comfyui``; --check exits 4 in one line.
    The file the patch creates stays behind when untracked: install takes it as made, uninstall removes it."""
    root, patch = moved_tree(tmp_path, {}, in_git=True)
    before = tree_hashes(root)
    install(root, patch, inst.PACKAGE_DIR)
    if new_file == "added":
        _git(root, "add", "comfy/quant_hook.py")
    subprocess.run(["git", "-c", "user.name=comfyui", "-c", "user.email=comfy@ui", "stash", "-q"], cwd=root, check=True,
                   env={**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)})
    assert read_tree(root) == (ORIGINAL if new_file == "added" else {**ORIGINAL, "comfy/quant_hook.py": "HOOKED = True\n"})
    r = _cli(root, "--check", "--patch", str(patch))
    assert r.returncode == 4 and r.stdout == (
        f"{root}: the int4 patch is not applied (the package is there): ComfyUI's updater stashed it (git stash "
        f"list); run `python -m comfy.quant install-comfyui {root}` to put it back\n"), r.stdout + r.stderr
    assert install(root, patch, inst.PACKAGE_DIR).action == "installed (patch applied, package files updated)"
    assert read_tree(root) == PATCHED and check(root, patch, inst.PACKAGE_DIR).state is State.CURRENT
    uninstall(root, patch, inst.PACKAGE_DIR)
    assert worktree(tree_hashes(root)) == worktree(before)  # the stash is still in .git


# --- what the installer adds to a ComfyUI tree -------------------------------------------------------

BUDGET_UPSTREAM_CODE = (200, 50)   # lines added, removed in upstream's own files (its tests-unit/ aside)
BUDGET_PACKAGE_LINES = 6000        # lines of the files copied to comfy/quant


def footprint(patch: bytes, source: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]]]:
    """([(upstream file, lines added, lines removed)] from the patch, [(comfy/quant file, lines)] copied)."""
    changed, current = {}, None
    for line in patch.decode().splitlines():
        if line.startswith("diff --git "):
            current = line.split(" b/", 1)[1]
            changed[current] = [0, 0]
        elif line.startswith(("+++", "---")) or current is None:
            continue
        elif line.startswith(("+", "-")):
            changed[current][line[0] == "-"] += 1
    files = inst._expected_files(source, patch)
    return ([(name, a, r) for name, (a, r) in changed.items()],
            [(f"comfy/quant/{rel}", data.count(b"\n")) for rel, data in sorted(files.items())])


def format_footprint(upstream, package) -> str:
    code = [row for row in upstream if not row[0].startswith("tests-unit/")]
    lines = ["| upstream file (patched) | + | - |", "|---|---:|---:|"]
    lines += [f"| {name} | {a} | {r} |" for name, a, r in upstream]
    lines.append(f"| **upstream code, {len(code)} files** | **{sum(a for _, a, _ in code)}** | "
                 f"**{sum(r for _, _, r in code)}** |")
    lines += ["", "| file added | lines |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in package]
    lines.append(f"| **comfy/quant/, {len(package)} files (+ the INSTALLED_FROM marker)** | "
                 f"**{sum(n for _, n in package)}** |")
    return "\n".join(lines)


def test_what_the_installer_adds_stays_within_budget(capsys):
    """The lines the shipped patch adds to / removes from upstream's files and the files it copies, per file,
    printed (shown without -s) and held to a budget: the core change stays small."""
    patch = inst.DEFAULT_PATCH.read_bytes()
    upstream, package = footprint(patch, inst.PACKAGE_DIR)
    with capsys.disabled():
        print(f"\nWhat install-comfyui adds to ComfyUI ({inst.DEFAULT_PATCH.name}):\n"
              + format_footprint(upstream, package))
    assert {name for name, _, _ in upstream} == set(inst.patch_files(patch))
    assert all(name.startswith(("comfy/", "tests-unit/")) for name, _, _ in upstream)
    code = [row for row in upstream if not row[0].startswith("tests-unit/")]
    added, removed = sum(a for _, a, _ in code), sum(r for _, _, r in code)
    assert 0 < added <= BUDGET_UPSTREAM_CODE[0] and removed <= BUDGET_UPSTREAM_CODE[1], (added, removed)
    assert sum(n for _, n in package) <= BUDGET_PACKAGE_LINES
    assert not [name for name, _ in package if "quant_tools" in name or name.endswith((".pyc", "cli.py"))]


def test_footprint_counts_a_known_patch(env):
    root, patch, source = env
    upstream, package = footprint(patch.read_bytes(), source)
    # ORIGINAL -> PATCHED: nodes.py one line changed, ops.py one added, quant_hook.py one new line
    assert sorted(upstream) == [("comfy/ops.py", 1, 0), ("comfy/quant_hook.py", 1, 0), ("nodes.py", 1, 1)]
    assert dict(package)["comfy/quant/formats/base.py"] == 1
    assert dict(package)["comfy/quant/upstream/comfyui.patch"] == patch.read_bytes().count(b"\n")


def test_stash_then_upstream_moved_merges_and_uninstall_removes_the_created_file(tmp_path):
    """The updater's case on a newer upstream: the patch stashed, the file it created left behind (untracked),
    the context moved: install merges 3-way and keeps the created file's part, so uninstall removes it."""
    root, patch = moved_tree(tmp_path, {}, in_git=True)
    install(root, patch, inst.PACKAGE_DIR)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}
    subprocess.run(["git", "-c", "user.name=comfyui", "-c", "user.email=comfy@ui", "stash", "-q"], cwd=root,
                   check=True, env=env)
    (root / "comfy" / "ops.py").write_text(MOVED["comfy/ops.py"])
    _git(root, "commit", "-q", "-am", "upstream v2")
    before = worktree(tree_hashes(root))
    assert check(root, patch, inst.PACKAGE_DIR).state is State.PATCH_NOT_APPLIED
    out = install(root, patch, inst.PACKAGE_DIR)
    assert out.action.startswith("installed (patch merged 3-way")
    assert (root / "comfy" / "ops.py").read_text() == MOVED["comfy/ops.py"].replace(
        "    return disable_weight_init\n", "    import comfy.quant\n    return disable_weight_init\n")
    assert check(root, patch, inst.PACKAGE_DIR).state is State.CURRENT
    uninstall(root, patch, inst.PACKAGE_DIR)
    after = worktree(tree_hashes(root))
    assert "comfy/quant_hook.py" not in after
    assert after == {k: v for k, v in before.items() if k != "comfy/quant_hook.py" and not k.startswith("comfy/quant/")}

"""Install this package into a user's ComfyUI checkout, check it, and take it out again.

"Installed" means two things, done all-or-nothing:

* the run-time package directory (``comfy/quant/`` here, without ``__pycache__``/``*.pyc``) is copied to
  ``PATH/comfy/quant/``, with a marker file ``INSTALLED_FROM`` that says it is ours;
* the core patch (``comfy/quant_tools/upstream/comfyui*.patch``, ``git diff``s against upstream ComfyUI) is
  applied to the files of PATH: with ``git apply`` (work tree only, never the index; no fuzz) where it
  applies, else, in a git checkout that holds the blobs the patch was made from (its ``index`` lines name
  them), by ``git apply -3`` in a scratch repository: a 3-way merge, refused on any conflict.

The copied package carries, at ``upstream/comfyui.patch``, the patch as applied to this tree (after a
merge, the diff the merge made), so a later ``uninstall`` reverses exactly that, even from a different
checkout of this project. Every failure puts the touched files back byte for byte.

ComfyUI's updater (``.ci/update_windows/update.py``) runs ``git stash`` (tracked files only) before it
pulls: the patch goes into the stash and the package (untracked) stays. ``check`` reports that state as
``PATCH_NOT_APPLIED``; ``install`` puts the patch back, merging it into the new version where it must.

Library functions log and return a :class:`Status` / :class:`Outcome`, or raise :class:`InstallError`
(whose message starts with the path it is about); ``python -m comfy.quant install-comfyui`` prints.
"""
from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "quant"  # the run-time package that is installed
PATCH_DIR = Path(__file__).resolve().parent / "upstream"
DEFAULT_PATCH = PATCH_DIR / "comfyui.patch"
PATCH_IN_PACKAGE = "upstream/comfyui.patch"  # relative to the package, as a posix path
MARKER = "INSTALLED_FROM"
MARKER_SIGNATURE = "# comfy.quant installed by `python -m comfy.quant install-comfyui`"
# The upstream trees the patch is tested on: (commit, comfyui_version.py's __version__, date).
KNOWN_TREES = (("4f874c5", "0.29.0", "2026-07-29"), ("6db4fa2f", "0.30.0", "2026-08-07"))
SUPPORTED = "ComfyUI {1} ({0}, {2}) to {4} ({3}, {5})".format(*KNOWN_TREES[0], *KNOWN_TREES[-1])


class InstallError(ValueError):
    """A refusal or failure; the message names the path and the problem, on one line."""

    def __init__(self, path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


class State(enum.Enum):
    NOT_INSTALLED = "not installed"
    CURRENT = "installed and current"
    PACKAGE_OUTDATED = "installed but package outdated"
    PATCH_NOT_APPLIED = "the int4 patch is not applied (the package is there)"
    PATCH_OUTDATED = "installed with an older patch"
    PATCH_DOES_NOT_APPLY = "patch does not apply"
    FOREIGN = "comfy/quant exists and is not ours"


# ``install-comfyui --check`` exit status per state: 0 current, 1 install would do it, 4 ComfyUI's updater (or
# a revert) took the patch out, 5 the patch does not apply to this ComfyUI.
CHECK_EXIT = {State.CURRENT: 0, State.NOT_INSTALLED: 1, State.PACKAGE_OUTDATED: 1, State.PATCH_OUTDATED: 1,
              State.FOREIGN: 1, State.PATCH_NOT_APPLIED: 4, State.PATCH_DOES_NOT_APPLY: 5}


@dataclass(frozen=True)
class Status:
    """What ``check`` found. ``detail`` says why, where there is something to say."""
    path: Path
    state: State
    detail: str = ""
    patch_applied: bool = False    # a patch of ours reverse-applies cleanly
    package: str = "absent"        # absent | current | outdated | foreign

    @property
    def current(self) -> bool:
        return self.state is State.CURRENT

    @property
    def exit_code(self) -> int:
        return CHECK_EXIT[self.state]

    def line(self) -> str:
        return f"{self.path}: {self.state.value}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Outcome:
    """What ``install`` / ``uninstall`` did: ``action`` is one short phrase, ``changed`` whether disk changed."""
    path: Path
    action: str
    changed: bool

    def line(self) -> str:
        return f"{self.path}: {self.action}"


@dataclass(frozen=True)
class _Plan:
    """How a patch goes into a tree: ``applied`` is what to keep for uninstall, ``merged`` the files a 3-way
    merge made (None: ``git apply`` the patch itself)."""
    source: bytes
    applied: bytes
    merged: dict | None = None
    to_apply: bytes | None = None  # what ``git apply`` gets, where not ``applied`` (files already there left out)


# --- git --------------------------------------------------------------------------------------------

def _git_env(root: Path) -> dict:
    """Environment for git under ``root``: never discover a repository *above* root.

    Without this, a ComfyUI folder inside some other repository makes ``git apply`` resolve the patch's
    paths against that outer repository and skip every file while exiting 0.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_PREFIX",
                        "GIT_ALTERNATE_OBJECT_DIRECTORIES")}
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    env["LC_ALL"] = "C"  # stable error text to quote
    return env


def _git(root: Path, *args: str, data: bytes | None = None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, input=data, capture_output=True, env=env or _git_env(root))


def _first_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith("error:")), lines[0] if lines else f"git exit {proc.returncode}")
    return first.removeprefix("error:").strip()


def _git_apply(root: Path, patch: bytes, *flags: str) -> tuple[bool, str]:
    """``git apply FLAGS -`` in root, patch on stdin. Returns (ok, first error line of stderr)."""
    proc = _git(root, "apply", "--whitespace=nowarn", *flags, "-", data=patch)
    return (True, "") if proc.returncode == 0 else (False, _first_error(proc))


def _source_commit(source: Path) -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def _objects_dir(root: Path) -> Path | None:
    """The object store of the git checkout whose top is ``root`` (None: root is no checkout's top)."""
    proc = _git(root, "rev-parse", "--show-toplevel", "--git-path", "objects")
    lines = proc.stdout.decode().splitlines()
    if proc.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return None
    return (root / lines[1]).resolve()


def _stashed_by_updater(root: Path, patch: bytes) -> bool:
    """Whether the checkout's latest stash was made by ComfyUI's updater (pygit2, as ``comfyui``) and holds
    changes to files the patch changes."""
    author = _git(root, "log", "-1", "--format=%an", "refs/stash").stdout.decode().strip()
    names = _git(root, "diff", "--name-only", "refs/stash^1", "refs/stash").stdout.decode().split()
    return author == "comfyui" and bool(set(names) & set(patch_files(patch)))


def _blocked_update(root: Path, patch: bytes) -> list[str]:
    """Patched files that the checkout's upstream branch (as last fetched) changes too: ``git pull`` (as
    ComfyUI-Manager runs it) refuses to overwrite those while the patch is in."""
    proc = _git(root, "diff", "--name-only", "HEAD...@{upstream}")
    if proc.returncode != 0:
        return []
    return sorted(set(proc.stdout.decode().split()) & set(patch_files(patch)))


# --- patches and trees ------------------------------------------------------------------------------

def shipped_patches() -> list[Path]:
    """``comfyui.patch`` (for every supported tree), then any per-tree ``comfyui-<commit>.patch``."""
    return sorted(PATCH_DIR.glob("comfyui*.patch"), key=lambda p: (p.name != DEFAULT_PATCH.name, p.name))


def _sections(patch: bytes) -> list[tuple[str, bytes]]:
    """(path, that file's part of the patch), in order."""
    parts = re.split(rb"(?m)^(?=diff --git )", patch)
    return [(part.split(b"\n", 1)[0].decode("utf-8", "replace").split(" b/", 1)[-1], part)
            for part in parts if part.startswith(b"diff --git ")]


def patch_files(patch: bytes) -> dict[str, str | None]:
    """path -> the pre-image blob id the patch's ``index`` line names (None for a new file or no index line)."""
    files = {}
    for rel, part in _sections(patch):
        m = re.search(rb"(?m)^index ([0-9a-f]+)\.\.", part)
        files[rel] = m.group(1).decode() if m and m.group(1).strip(b"0") else None
    return files


def _created_already(root: Path, patch: bytes) -> list[str]:
    """Files the patch creates that are there already, byte for byte as it makes them: ``git stash`` (as
    ComfyUI's updater runs it) keeps untracked files, so it leaves them behind."""
    there = []
    for rel, part in _sections(patch):
        m = re.search(rb"(?m)^index 0+\.\.([0-9a-f]+)", part)
        if m and (root / rel).is_file() and _blob_id((root / rel).read_bytes()).startswith(m.group(1).decode()):
            there.append(rel)
    return there


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def made_for(root: Path, patch: bytes) -> bool:
    """Whether every file the patch changes is, byte for byte, the one it was made from."""
    for rel, pre in patch_files(patch).items():
        p = root / rel
        if (pre is None) != (not p.is_file()) or (pre and not _blob_id(p.read_bytes()).startswith(pre)):
            return False
    return True


def describe_tree(root: Path) -> str:
    """``ComfyUI 0.30.0 (6db4fa2f)``, ``ComfyUI 0.31.0 (not a tested version)`` or ``ComfyUI of unknown version``."""
    try:
        text = (root / "comfyui_version.py").read_text("utf-8", "replace")
    except OSError:
        return "ComfyUI of unknown version"
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if not m:
        return "ComfyUI of unknown version"
    commit = next((c for c, v, _ in KNOWN_TREES if v == m.group(1)), None)
    return f"ComfyUI {m.group(1)} ({commit or 'not a tested version'})"


# --- package files ----------------------------------------------------------------------------------

def _package_files(root: Path) -> dict[str, bytes]:
    """rel posix path -> bytes, for every file under root except caches and the marker."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if "__pycache__" in rel.parts or p.suffix == ".pyc" or rel.as_posix() == MARKER or not p.is_file():
            continue
        files[rel.as_posix()] = p.read_bytes()
    return files


def _expected_files(source: Path, applied: bytes) -> dict[str, bytes]:
    """What PATH/comfy/quant should hold (marker aside): the source package, carrying the applied patch."""
    files = _package_files(source)
    files[PATCH_IN_PACKAGE] = applied
    return files


def _is_ours(dest: Path) -> bool:
    marker = dest / MARKER
    try:
        return marker.is_file() and marker.read_text("utf-8", "replace").startswith(MARKER_SIGNATURE)
    except OSError:
        return False


def _marker_field(dest: Path, name: str) -> str | None:
    try:
        text = (dest / MARKER).read_text("utf-8", "replace")
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(name + ":")), None)


def _is_empty(dest: Path) -> bool:
    """A directory holding no files but caches (say, left behind by ``git clean`` of the .py files)."""
    return dest.is_dir() and not any(
        p.is_file() and "__pycache__" not in p.relative_to(dest).parts and p.suffix != ".pyc"
        for p in dest.rglob("*"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _marker_text(root: Path, source: Path, plan: _Plan, files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel, data in sorted(files.items()):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return (f"{MARKER_SIGNATURE}; `--uninstall` removes it.\n"
            f"source: {source}\n"
            f"source_commit: {_source_commit(source)}\n"
            f"upstream_comfyui: {describe_tree(root)}\n"
            f"applied_by: {'3-way merge' if plan.merged is not None else 'git apply'}\n"
            f"patch_sha256: {_sha(plan.source)}\n"
            f"package_sha256: {digest.hexdigest()}\n")


# --- checks -----------------------------------------------------------------------------------------

def _preflight(path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise InstallError(path, "no such directory")
    if not (root / "comfy").is_dir() or not (root / "nodes.py").is_file():
        raise InstallError(path, "does not look like ComfyUI (expected comfy/ and nodes.py)")
    if shutil.which("git") is None:
        raise InstallError(path, "git not found on PATH; it is needed to apply the patch")
    return root


def _read_patch(path, patch) -> bytes:
    try:
        data = Path(patch).read_bytes()
    except OSError as e:
        raise InstallError(path, f"cannot read patch {patch}: {e.strerror or e}") from None
    if not data.strip():
        raise InstallError(path, f"patch {patch} is empty")
    return data


def _read_patches(path, patch) -> list[bytes]:
    """The patch given, else every shipped one (the one made for this tree's exact files first)."""
    paths = [patch] if patch is not None else shipped_patches()
    if not paths:
        raise InstallError(path, f"no comfyui*.patch in {PATCH_DIR}")
    patches = [_read_patch(path, p) for p in paths]
    root = Path(path)
    return sorted(patches, key=lambda data: not made_for(root, data))


def _patch_state(root: Path, patch: bytes, ours: bool) -> tuple[bool | None, str]:
    """(True: applied, False: applies cleanly, None: neither; why).

    Where neither, ``why`` is git's first error going forward, or, when our package is there (so the patch
    was most likely applied and then edited), going in reverse: that one names the edited file.
    """
    reverse_ok, reverse_why = _git_apply(root, patch, "--check", "--reverse")
    forward_ok, forward_why = _git_apply(root, patch, "--check")
    if reverse_ok and forward_ok:  # a patch whose pre- and post-images both match: let the marker decide
        return ours, ""
    if reverse_ok:
        return True, ""
    if forward_ok:
        return False, ""
    return None, reverse_why if ours else forward_why


def _scratch_env(scratch: Path, objects: Path) -> dict:
    """git in a scratch repository that reads ``objects`` too, with no user or system configuration."""
    return {**_git_env(scratch), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "install", "GIT_AUTHOR_EMAIL": "install@localhost",
            "GIT_COMMITTER_NAME": "install", "GIT_COMMITTER_EMAIL": "install@localhost"}


def _merge_error(proc: subprocess.CompletedProcess) -> str:
    stderr = proc.stderr.decode("utf-8", "replace")
    conflicts = re.findall(r"Applied patch to '([^']+)' with conflicts", stderr)
    if conflicts:
        return f"3-way merge conflicts in {', '.join(conflicts)}"
    if "lacks the necessary blob" in stderr:
        return "no 3-way merge: the git history lacks the files the patch was made from"
    return f"3-way merge failed: {_first_error(proc)}"


def _merge(root: Path, patch: bytes, rest: bytes, created: bytes) -> tuple[_Plan | None, str]:
    """A 3-way merge of ``rest`` (``patch`` less the files it creates that are there already, ``created``)
    into root's files: ``git apply -3`` in a scratch repository that borrows root's git objects, so root's
    index and history are never touched. (None, why) on any conflict."""
    objects = _objects_dir(root)
    if objects is None:
        return None, "not a git checkout, so no 3-way merge"
    rels = list(patch_files(rest))
    with tempfile.TemporaryDirectory(prefix="quant-merge-") as tmp:
        scratch = Path(tmp)
        env = _scratch_env(scratch, objects)
        for rel in rels:
            if (root / rel).is_file():
                (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, scratch / rel)
        for args in (("init", "-q"), ("add", "-A"), ("commit", "-q", "--allow-empty", "-m", "tree")):
            if _git(scratch, *args, env=env).returncode != 0:
                return None, f"git {args[0]} failed in a scratch repository"
        proc = _git(scratch, "apply", "-3", "--whitespace=nowarn", "-", data=rest, env=env)
        if proc.returncode != 0:
            return None, _merge_error(proc)
        diff = _git(scratch, "diff", "--no-color", "--no-ext-diff", "--no-renames", "--full-index", "HEAD", env=env)
        merged = {rel: (scratch / rel).read_bytes() if (scratch / rel).is_file() else None for rel in rels}
    return _Plan(patch, diff.stdout + created, merged), ""


def _split_created(root: Path, patch: bytes) -> tuple[bytes, bytes]:
    """(the patch less the files it creates that are there already, those files' sections)."""
    there = _created_already(root, patch)
    sections = _sections(patch)
    return (b"".join(part for rel, part in sections if rel not in there),
            b"".join(part for rel, part in sections if rel in there))


def _plan(root: Path, patches: list[bytes]) -> tuple[_Plan | None, str]:
    """The first patch that applies as it is, else the first that merges 3-way; else (None, why)."""
    whys = []
    for patch in patches:
        rest, _ = _split_created(root, patch)
        ok, why = _git_apply(root, rest, "--check") if rest else (True, "")
        if ok:
            return _Plan(patch, patch, to_apply=rest), ""
        whys.append(why)
    for patch in patches:
        plan, why = _merge(root, patch, *_split_created(root, patch))
        if plan is not None:
            return plan, ""
        whys.append(why)
    return None, "; ".join(dict.fromkeys(whys))


def _not_applicable(root: Path, why: str) -> str:
    return f"{describe_tree(root)} ({why}); supported: {SUPPORTED}"


def _applied_status(root, dest, ours, applied: bytes, patches, source) -> tuple[Status, _Plan]:
    package = "absent"
    if ours:
        package = "current" if _package_files(dest) == _expected_files(source, applied) else "outdated"
    origin = applied if applied in patches else next(
        (p for p in patches if ours and _sha(p) == _marker_field(dest, "patch_sha256")), None)
    plan = _Plan(origin or applied, applied)
    if origin is None:
        return Status(root, State.PATCH_OUTDATED, "uninstall first, then install", True, package), plan
    if package == "current":
        blocked = _blocked_update(root, applied)
        detail = (f"`git pull` refuses the ComfyUI update while the patch is in ({', '.join(blocked)}); run "
                  "install-comfyui --uninstall, update, then install-comfyui" if blocked else "")
        return Status(root, State.CURRENT, detail, patch_applied=True, package=package), plan
    return Status(root, State.PACKAGE_OUTDATED, "patch applied, package missing" if package == "absent"
                  else "patch applied, package files differ", patch_applied=True, package=package), plan


def _status(root: Path, patches: list[bytes], source: Path) -> tuple[Status, _Plan | None]:
    """The state, and the patch as it is in the tree or as it would go in (None: it cannot go in)."""
    dest = root / "comfy" / "quant"
    present = dest.exists() and not _is_empty(dest)
    ours = present and dest.is_dir() and _is_ours(dest)
    if present and not ours:
        return Status(root, State.FOREIGN, f"{dest} has no {MARKER} marker; refusing to overwrite it",
                      package="foreign"), None
    installed = dest / PATCH_IN_PACKAGE
    candidates = ([installed.read_bytes()] if ours and installed.is_file() else []) + patches
    edited = ""  # where ours is there: the file that stops its patch from reversing
    for candidate in dict.fromkeys(candidates):
        state, why = _patch_state(root, candidate, ours)
        if state is True:
            return _applied_status(root, dest, ours, candidate, patches, source)
        edited = edited or (why if ours else "")
    plan, why = _plan(root, patches)
    package = "outdated" if ours else "absent"
    if plan is None:
        return Status(root, State.PATCH_DOES_NOT_APPLY, _not_applicable(root, edited or why), package=package), None
    if not ours:
        return Status(root, State.NOT_INSTALLED), plan
    who = "ComfyUI's updater stashed it (git stash list)" if _stashed_by_updater(root, plan.source) else \
        "ComfyUI's updater stashes local changes, or the patched files were reverted"
    return Status(root, State.PATCH_NOT_APPLIED, f"{who}; run `python -m comfy.quant install-comfyui {root}` "
                                                 "to put it back", package=package), plan


def check(path, patch=None, source=PACKAGE_DIR) -> Status:
    """The install state of ComfyUI at ``path``; changes nothing. ``patch``: one patch file (default: the
    shipped ones). Raises InstallError only if it cannot tell (not a ComfyUI folder, no git, unreadable patch)."""
    root = _preflight(path)
    status = _status(root, _read_patches(path, patch), Path(source))[0]
    log.info("%s", status.line())
    return status


# --- install / uninstall ----------------------------------------------------------------------------

def _write_tree(target: Path, files: dict[str, bytes], marker: str) -> None:
    for rel, data in files.items():
        out = target / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    (target / MARKER).write_text(marker, "utf-8")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _snapshot(root: Path, patch: bytes) -> dict[str, bytes | None]:
    """The bytes of every file the patch touches (None: absent), to put back on a failure."""
    return {rel: (root / rel).read_bytes() if (root / rel).is_file() else None for rel in patch_files(patch)}


def _restore(root: Path, files: dict[str, bytes | None]) -> None:
    for rel, data in files.items():
        p = root / rel
        if data is None:
            p.unlink(missing_ok=True)
        elif not p.is_file() or p.read_bytes() != data:
            p.write_bytes(data)


def _apply(root: Path, path, plan: _Plan) -> None:
    if plan.merged is None:
        data = plan.applied if plan.to_apply is None else plan.to_apply
        ok, why = _git_apply(root, data) if data else (True, "")
        if not ok:
            raise InstallError(path, f"git apply failed: {why}")
        return
    for rel, data in plan.merged.items():
        if data is None:
            (root / rel).unlink(missing_ok=True)
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)


def install(path, patch=None, source=PACKAGE_DIR) -> Outcome:
    """Copy the package and apply the patch, both or neither. A no-op when already installed and current;
    only the package files are replaced when just they are outdated. ``patch``: one patch file (default: the
    shipped ones, the first that applies or merges)."""
    root = _preflight(path)
    source = Path(source)
    patches = _read_patches(path, patch)
    status, plan = _status(root, patches, source)
    if status.state is State.CURRENT:
        log.info("%s: already installed", root)
        return Outcome(root, "already installed", changed=False)
    if status.state is State.FOREIGN:
        raise InstallError(path, status.detail)
    if status.state is State.PATCH_DOES_NOT_APPLY:
        raise InstallError(path, f"patch does not apply to {status.detail}")
    if status.state is State.PATCH_OUTDATED:
        raise InstallError(path, "installed with an older patch; run --uninstall first, then install")
    dest = root / "comfy" / "quant"
    if dest.resolve() == source.resolve():
        raise InstallError(path, "the installer runs from this ComfyUI's own comfy/quant; "
                                 "run it from the project checkout")
    if status.patch_applied:  # the patch is in: keep the one applied
        _swap_package(root, path, source, plan, None)
        return Outcome(root, "patch already applied; package files updated", changed=True)
    _swap_package(root, path, source, plan, _snapshot(root, plan.applied))
    how = "patch merged 3-way into " + describe_tree(root) if plan.merged is not None else "patch applied"
    if status.package == "absent":
        return Outcome(root, f"installed ({how}, package copied)", changed=True)
    return Outcome(root, f"installed ({how}, package files updated)", changed=True)


def _swap_package(root: Path, path, source: Path, plan: _Plan, originals) -> None:
    """Stage the package, apply the plan (unless ``originals`` is None), swap the package in; on any failure
    put everything back."""
    dest = root / "comfy" / "quant"
    files = _expected_files(source, plan.applied)
    work = backup = None
    try:
        # 1. Stage the whole package next to its place: nothing visible changes if this fails.
        work = Path(tempfile.mkdtemp(prefix=".quant-install-", dir=root / "comfy"))
        staging = work / "new"
        _write_tree(staging, files, _marker_text(root, source, plan, files))
        # 2. The patch.
        if originals is not None:
            _apply(root, path, plan)
            log.info("%s: %s the patch", root, "applied" if plan.merged is None else "merged")
        # 3. Swap the staged package in.
        if dest.exists() or dest.is_symlink():
            backup = work / "old"
            os.replace(dest, backup)
        os.replace(staging, dest)
        log.info("%s: copied %d package files to %s", root, len(files), dest)
    except BaseException as e:
        _rollback(root, originals, work, backup, dest)
        if isinstance(e, OSError):
            raise InstallError(path, f"install failed and was rolled back: {e}") from e
        raise
    try:
        shutil.rmtree(work)
    except OSError as e:
        log.warning("%s: installed, but could not remove the scratch folder %s: %s", root, work, e)


def _rollback(root: Path, originals, work, backup, dest: Path) -> None:
    """Undo a half-done install; log, never raise, so the original error is what the user sees."""
    try:
        if backup is not None and backup.exists():
            if dest.exists() or dest.is_symlink():
                _remove(dest)
            os.replace(backup, dest)
        if work is not None and work.exists():
            shutil.rmtree(work)
        if originals is not None:
            _restore(root, originals)
        log.info("%s: rolled back", root)
    except OSError as e:
        log.error("%s: rollback incomplete: %s", root, e)


def uninstall(path, patch=None, source=PACKAGE_DIR) -> Outcome:
    """Reverse the patch and remove PATH/comfy/quant. The patch reversed is the copy inside the installed
    package (the one applied), else ``patch`` (default: the shipped ones). A no-op when nothing is installed."""
    root = _preflight(path)
    dest = root / "comfy" / "quant"
    present = dest.exists() and not _is_empty(dest)
    ours = present and dest.is_dir() and _is_ours(dest)
    if present and not ours:
        raise InstallError(path, f"{dest} has no {MARKER} marker; it was not installed by this tool, "
                                 "leaving it alone")
    candidates = []
    if ours and (dest / PATCH_IN_PACKAGE).is_file():
        candidates.append(dest / PATCH_IN_PACKAGE)
    candidates += [p for p in ([Path(patch)] if patch is not None else shipped_patches()) if p.is_file()]
    if not candidates:
        if not present:
            return Outcome(root, "nothing installed", changed=False)
        raise InstallError(path, f"no patch to reverse: {dest / PATCH_IN_PACKAGE} is missing")

    results = [(_patch_state(root, data, ours), data) for data in (_read_patch(path, c) for c in candidates)]
    chosen = next((data for (state, _), data in results if state is True), None)
    if chosen is None:
        if not present:
            return Outcome(root, "nothing installed", changed=False)
        if any(state is False for (state, _), _ in results):
            raise InstallError(path, "patch is not applied (the patched files are upstream's) but comfy/quant "
                                     "is ours; remove it by hand, or install again")
        why = next(why for (state, why), _ in results if state is None)
        raise InstallError(path, f"patched files were edited since install, cannot reverse the patch: {why}")

    # Move the package aside first (atomic), reverse the patch (atomic), then delete the package.
    work = aside = None
    try:
        work = Path(tempfile.mkdtemp(prefix=".quant-uninstall-", dir=root / "comfy"))
        if dest.exists() or dest.is_symlink():
            aside = work / "quant"
            os.replace(dest, aside)
        ok, why = _git_apply(root, chosen, "--reverse")
        if not ok:
            raise InstallError(path, f"git apply --reverse failed: {why}")
    except BaseException as e:
        if aside is not None and aside.exists() and not dest.exists():
            os.replace(aside, dest)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):
            raise InstallError(path, f"uninstall failed and was rolled back: {e}") from e
        raise
    log.info("%s: reversed the patch", root)
    try:
        shutil.rmtree(work)
    except OSError as e:
        log.warning("%s: patch reversed, but could not remove %s: %s", root, work, e)
    return Outcome(root, "uninstalled (patch reversed, comfy/quant removed)" if present
                   else "uninstalled (patch reversed; comfy/quant was already gone)", changed=True)

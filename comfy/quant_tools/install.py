"""Install this package into a user's ComfyUI checkout, check it, and take it out again.

"Installed" means two things, done all-or-nothing:

* the package directory (``comfy/quant/`` here, without ``__pycache__``/``*.pyc``) is copied to
  ``PATH/comfy/quant/``, with a marker file ``INSTALLED_FROM`` that says it is ours;
* the core patch (``comfy/quant_tools/upstream/comfyui.patch``, a ``git diff`` against upstream ComfyUI) is
  applied to the files of PATH with ``git apply`` (work tree only, never the index; no fuzz).

The copied package carries, at ``upstream/comfyui.patch``, the very patch that was applied, so a later
``uninstall`` reverses exactly that patch, even from a different checkout of this project.

Library functions log and return a :class:`Status` / :class:`Outcome`, or raise :class:`InstallError`
(whose message starts with the path it is about); ``python -m comfy.quant install-comfyui`` prints.
"""
from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "quant"  # the run-time package that is installed
DEFAULT_PATCH = Path(__file__).resolve().parent / "upstream" / "comfyui.patch"
PATCH_IN_PACKAGE = "upstream/comfyui.patch"  # relative to the package, as a posix path
MARKER = "INSTALLED_FROM"
MARKER_SIGNATURE = "# comfy.quant installed by `python -m comfy.quant install-comfyui`"
UPSTREAM_COMMIT = "4f874c5"


class InstallError(ValueError):
    """A refusal or failure; the message names the path and the problem, on one line."""

    def __init__(self, path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


class State(enum.Enum):
    NOT_INSTALLED = "not installed"
    CURRENT = "installed and current"
    PACKAGE_OUTDATED = "installed but package outdated"
    PATCH_NOT_APPLIED = "package present but patch not applied"
    PATCH_OUTDATED = "installed with an older patch"
    PATCH_DOES_NOT_APPLY = "patch does not apply"
    FOREIGN = "comfy/quant exists and is not ours"


@dataclass(frozen=True)
class Status:
    """What ``check`` found. ``detail`` says why, where there is something to say."""
    path: Path
    state: State
    detail: str = ""
    patch_applied: bool = False    # the given patch reverse-applies cleanly
    package: str = "absent"        # absent | current | outdated | foreign

    @property
    def current(self) -> bool:
        return self.state is State.CURRENT

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


# --- git --------------------------------------------------------------------------------------------

def _git_env(root: Path) -> dict:
    """Environment for git under ``root``: never discover a repository *above* root.

    Without this, a ComfyUI folder inside some other repository makes ``git apply`` resolve the patch's
    paths against that outer repository and skip every file while exiting 0.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_PREFIX")}
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    env["LC_ALL"] = "C"  # stable error text to quote
    return env


def _git_apply(root: Path, patch: bytes, *flags: str) -> tuple[bool, str]:
    """``git apply FLAGS -`` in root, patch on stdin. Returns (ok, first error line of stderr)."""
    cmd = ["git", "apply", "--whitespace=nowarn", *flags, "-"]
    proc = subprocess.run(cmd, cwd=root, input=patch, capture_output=True, env=_git_env(root))
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == 0:
        return True, ""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith("error:")), lines[0] if lines else f"git apply exit {proc.returncode}")
    return False, first.removeprefix("error:").strip()


def _source_commit(source: Path) -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


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


def _expected_files(source: Path, patch: bytes) -> dict[str, bytes]:
    """What PATH/comfy/quant should hold (marker aside): the source package, carrying the applied patch."""
    files = _package_files(source)
    files[PATCH_IN_PACKAGE] = patch
    return files


def _is_ours(dest: Path) -> bool:
    marker = dest / MARKER
    try:
        return marker.is_file() and marker.read_text("utf-8", "replace").startswith(MARKER_SIGNATURE)
    except OSError:
        return False


def _is_empty(dest: Path) -> bool:
    """A directory holding no files but caches (say, left behind by ``git clean`` of the .py files)."""
    return dest.is_dir() and not any(
        p.is_file() and "__pycache__" not in p.relative_to(dest).parts and p.suffix != ".pyc"
        for p in dest.rglob("*"))


def _marker_text(source: Path, patch: bytes, files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel, data in sorted(files.items()):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return (f"{MARKER_SIGNATURE}; `--uninstall` removes it.\n"
            f"source: {source}\n"
            f"source_commit: {_source_commit(source)}\n"
            f"upstream_comfyui: {UPSTREAM_COMMIT}\n"
            f"patch_sha256: {hashlib.sha256(patch).hexdigest()}\n"
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


def _status(root: Path, patch: bytes, source: Path) -> Status:
    dest = root / "comfy" / "quant"
    present = dest.exists() and not _is_empty(dest)
    ours = present and dest.is_dir() and _is_ours(dest)
    if present and not ours:
        return Status(root, State.FOREIGN, f"{dest} has no {MARKER} marker; refusing to overwrite it",
                      package="foreign")
    applied, why = _patch_state(root, patch, ours)
    package = "absent"
    if ours:
        package = "current" if _package_files(dest) == _expected_files(source, patch) else "outdated"
    if applied is True:
        if package == "current":
            return Status(root, State.CURRENT, patch_applied=True, package=package)
        return Status(root, State.PACKAGE_OUTDATED, "patch applied, package missing" if package == "absent"
                      else "patch applied, package files differ", patch_applied=True, package=package)
    if applied is False:
        if ours:
            return Status(root, State.PATCH_NOT_APPLIED, "the patched files are back to upstream", package=package)
        return Status(root, State.NOT_INSTALLED)
    if ours:  # the given patch neither applies nor is applied: maybe an older one of ours is
        installed = dest / PATCH_IN_PACKAGE
        if installed.is_file() and installed.read_bytes() != patch \
                and _git_apply(root, installed.read_bytes(), "--check", "--reverse")[0]:
            return Status(root, State.PATCH_OUTDATED, "uninstall first, then install", package=package)
    return Status(root, State.PATCH_DOES_NOT_APPLY, why, package=package)


def check(path, patch=DEFAULT_PATCH, source=PACKAGE_DIR) -> Status:
    """The install state of ComfyUI at ``path``; changes nothing. Raises InstallError only if it cannot tell
    (not a ComfyUI folder, no git, unreadable patch)."""
    root = _preflight(path)
    status = _status(root, _read_patch(path, patch), Path(source))
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


def install(path, patch=DEFAULT_PATCH, source=PACKAGE_DIR) -> Outcome:
    """Copy the package and apply the patch, both or neither. A no-op when already installed and current;
    only the package files are replaced when just they are outdated."""
    root = _preflight(path)
    patch_bytes = _read_patch(path, patch)
    source = Path(source)
    status = _status(root, patch_bytes, source)
    if status.state is State.CURRENT:
        log.info("%s: already installed", root)
        return Outcome(root, "already installed", changed=False)
    if status.state is State.FOREIGN:
        raise InstallError(path, status.detail)
    if status.state is State.PATCH_OUTDATED:
        raise InstallError(path, "installed with an older patch; run --uninstall first, then install")
    if status.state is State.PATCH_DOES_NOT_APPLY:
        raise InstallError(path, f"patch does not apply (ComfyUI {UPSTREAM_COMMIT} expected, "
                                 f"unedited): {status.detail}")

    dest = root / "comfy" / "quant"
    if dest.resolve() == source.resolve():
        raise InstallError(path, "the installer runs from this ComfyUI's own comfy/quant; "
                                 "run it from the project checkout")
    files = _expected_files(source, patch_bytes)
    apply_patch = not status.patch_applied
    work = backup = None
    patched = False
    try:
        # 1. Stage the whole package next to its place: nothing visible changes if this fails.
        work = Path(tempfile.mkdtemp(prefix=".quant-install-", dir=root / "comfy"))
        staging = work / "new"
        _write_tree(staging, files, _marker_text(source, patch_bytes, files))
        # 2. The patch (git apply is itself all-or-nothing).
        if apply_patch:
            ok, why = _git_apply(root, patch_bytes)
            if not ok:
                raise InstallError(path, f"git apply failed: {why}")
            patched = True
            log.info("%s: applied %s", root, patch)
        # 3. Swap the staged package in.
        if dest.exists() or dest.is_symlink():
            backup = work / "old"
            os.replace(dest, backup)
        os.replace(staging, dest)
        log.info("%s: copied %d package files to %s", root, len(files), dest)
    except BaseException as e:
        _rollback(root, patch_bytes, patched, work, backup, dest)
        if isinstance(e, OSError):
            raise InstallError(path, f"install failed and was rolled back: {e}") from e
        raise
    try:
        shutil.rmtree(work)
    except OSError as e:
        log.warning("%s: installed, but could not remove the scratch folder %s: %s", root, work, e)

    if not apply_patch:
        return Outcome(root, "patch already applied; package files updated", changed=True)
    if status.package == "absent":
        return Outcome(root, "installed (patch applied, package copied)", changed=True)
    return Outcome(root, "installed (patch applied, package files updated)", changed=True)


def _rollback(root: Path, patch: bytes, patched: bool, work, backup, dest: Path) -> None:
    """Undo a half-done install; log, never raise, so the original error is what the user sees."""
    try:
        if backup is not None and backup.exists():
            if dest.exists() or dest.is_symlink():
                _remove(dest)
            os.replace(backup, dest)
        if work is not None and work.exists():
            shutil.rmtree(work)
        if patched:
            ok, why = _git_apply(root, patch, "--reverse")
            if not ok:
                log.error("%s: rollback could not reverse the patch: %s", root, why)
        log.info("%s: rolled back", root)
    except OSError as e:
        log.error("%s: rollback incomplete: %s", root, e)


def uninstall(path, patch=DEFAULT_PATCH, source=PACKAGE_DIR) -> Outcome:
    """Reverse the patch and remove PATH/comfy/quant. The patch reversed is the copy inside the installed
    package (the one applied), else ``patch``. A no-op when nothing is installed."""
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
    if Path(patch).is_file():
        candidates.append(Path(patch))
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

"""Which kernel runs an int4 layer: the project's Triton kernels or comfy-kitchen's, chosen per device.

``COMFY_INT4_KERNELS`` (read at import; ``set_mode`` / ``forced`` change it at run time):

- ``auto`` (default): the project's Triton kernels on devices where they were measured faster than
  kitchen's (Hopper, compute capability 9.x; ``docs/benchmarks.md``), kitchen's everywhere else;
- ``triton``: the project's kernels wherever Triton can run them (CUDA; on the CPU through Triton's
  interpreter, which is slow and meant for tests);
- ``kitchen``: kitchen's kernels always.

The kernels live in ``triton_w4a4`` and ``triton_awq``; those modules import Triton, so they are
imported only when first chosen (importing this package imports neither, and a mistyped mode is read
as ``auto`` with one warning: ComfyUI imports this while it starts). A format asks
``w4a4_kernel(device)`` / ``awq_kernel(device, rows)`` and gets the module to call, or None for
kitchen's path. Within ``triton_w4a4``, ``gemm_codes(device)`` picks the GEMM: FP8 tensor cores on
Hopper with the Triton it was written for (3.6) once ``triton_w4a4.FP8_GEMM`` is on (after a Hopper
measurement), the int8 GEMM otherwise (one log line says why where the Triton differs).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV = "COMFY_INT4_KERNELS"
MODES = ("auto", "triton", "kitchen")
# AWQ rows up to which auto mode runs the project's kernels on Hopper (None: every M, its GEMV kernel for
# few rows and its GEMM kernel for many; kitchen's fused MMA path took 2.3 ms at M = 256 on the H100).
# 16 until the GEMM kernel is measured on a GPU.
AWQ_AUTO_MAX_ROWS = 16


class KernelModeError(ValueError):
    """A kernel mode that does not exist, or ``triton`` forced where Triton cannot run."""


def _checked(mode: str) -> str:
    if mode not in MODES:
        raise KernelModeError(f"{ENV}: expected one of {list(MODES)}, got {mode!r}")
    return mode


def _from_env() -> str:
    """The mode ``COMFY_INT4_KERNELS`` names; a mistyped value is logged once and read as ``auto`` (this
    package is imported while ComfyUI starts, where an exception would stop the start)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        logger.warning("%s=%r is not one of %s; using 'auto'", ENV, value, list(MODES))
        return "auto"
    return value


_mode = _from_env()


def mode() -> str:
    return _mode


def set_mode(new: str) -> str:
    """Set the kernel mode; returns the previous one."""
    global _mode
    old, _mode = _mode, _checked(new)
    return old


@contextlib.contextmanager
def forced(new: str):
    """``with forced("kitchen"): ...`` runs the block under another kernel mode."""
    old = set_mode(new)
    try:
        yield
    finally:
        set_mode(old)


_modules: dict = {}
_unavailable: dict = {}


def _load(name: str):
    """``comfy.quant.kernels.<name>``, or None (reason kept) when Triton cannot be imported."""
    if name in _modules:
        return _modules[name]
    if name in _unavailable:
        return None
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except (ImportError, AttributeError, RuntimeError) as e:  # no Triton (CPU wheels), or one too old for the kernels
        _unavailable[name] = f"{type(e).__name__}: {e}"
        logger.info("project int4 kernels unavailable (%s); using comfy-kitchen's", _unavailable[name])
        return None
    _modules[name] = mod
    return mod


def unavailable_reason(name: str) -> str | None:
    _load(name)
    return _unavailable.get(name)


def _hopper(device: torch.device) -> bool:
    """Whether ``device`` is a Hopper GPU (compute capability 9.x)."""
    if device.type != "cuda":
        return False
    return _capability_major(torch.cuda.current_device() if device.index is None else device.index) == 9


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    """Compute capability major of CUDA device ``index``, read once (a format asks on every forward)."""
    return torch.cuda.get_device_capability(index)[0]


def _pick(name: str, device: torch.device, auto_ok: bool):
    m = _mode
    if m == "kitchen" or (m == "auto" and not (auto_ok and _hopper(device))):
        return None
    if device.type not in ("cuda", "cpu"):
        return None
    mod = _load(name)
    if mod is None and m == "triton":
        raise KernelModeError(f"{ENV}=triton but the project's kernels cannot run: {_unavailable[name]}")
    return mod


def w4a4_kernel(device: torch.device):
    """The module running SVDQuant W4A4 on ``device`` (``linear``, ``grouped_linear``), or None for kitchen."""
    return _pick("triton_w4a4", device, auto_ok=True)


def awq_kernel(device: torch.device, rows: int):
    """The module running AWQ W4A16 for ``rows`` input rows on ``device`` (``linear``), or None for kitchen."""
    return _pick("triton_awq", device, auto_ok=AWQ_AUTO_MAX_ROWS is None or rows <= AWQ_AUTO_MAX_ROWS)


def describe(device: torch.device) -> dict:
    """Which kernel each format runs on ``device`` under the current mode (for logs and the benchmark)."""
    return {"mode": _mode,
            "svdquant_w4a4": "triton" if w4a4_kernel(device) else "kitchen",
            "awq_w4a16" + ("" if AWQ_AUTO_MAX_ROWS is None else f" (<= {AWQ_AUTO_MAX_ROWS} rows)"):
                "triton" if awq_kernel(device, 1) else "kitchen"}

"""Where the project's Triton kernels can be tested: a CUDA device, or the CPU under Triton's interpreter.

On a machine without CUDA, ``conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
Triton, so the same kernels run (slowly) on CPU tensors at small shapes.
"""
import pytest
import torch

from comfy.quant import kernels

W4A4 = kernels._load("triton_w4a4")
AWQ = kernels._load("triton_awq")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REASON = kernels.unavailable_reason("triton_w4a4")
if W4A4 is not None and not W4A4.runs_on(DEVICE):
    REASON = "Triton was imported without TRITON_INTERPRET=1 on a machine without CUDA"
requires_kernels = pytest.mark.skipif(REASON is not None, reason=f"project Triton kernels cannot run here: {REASON}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled kernels, timing-free determinism at full size)")


def assert_same_arithmetic(a, b, tol):
    """Two results of the same kernel arithmetic on the same inputs: bit-identical on a GPU (compiled
    kernels, fixed order, no atomics); on the CPU Triton's interpreter hands float dots to NumPy's BLAS,
    whose summation order may depend on memory alignment, so there they must agree within ``tol``
    (the kernel's own error bound)."""
    if a.is_cuda:
        assert torch.equal(a, b)
    else:
        assert ((a.double() - b.double()).abs() <= tol).all()

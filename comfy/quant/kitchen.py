"""The one place this package imports comfy-kitchen.

Any failure to import it leaves this module (and everything above it) importable, with the int4
formats reported unavailable; a kitchen build lacking one layout disables only that layout.
Backend set-up (which kitchen backends run) belongs to the host: upstream's ``comfy/quant_ops.py``
and this repository's do it once, for every kitchen layout.
"""
import logging

import torch

logger = logging.getLogger(__name__)

SVDQUANT_LAYOUT = "TensorCoreSVDQuantW4A4Layout"
AWQ_LAYOUT = "TensorCoreAWQW4A16Layout"

ck = None
kitchen_tensor = None
unavailable_reason = None
try:
    import comfy_kitchen as ck
    import comfy_kitchen.tensor as kitchen_tensor
except (ImportError, OSError, RuntimeError) as e:  # missing wheel, missing 'packaging', broken extension: no int4
    ck = None
    kitchen_tensor = None
    unavailable_reason = f"{type(e).__name__}: {e}"
    logger.warning("comfy-kitchen could not be imported (%s); int4 quantized layers are unavailable",
                   unavailable_reason)

if kitchen_tensor is not None:
    QuantizedTensor = kitchen_tensor.QuantizedTensor
else:
    class QuantizedTensor(torch.Tensor):  # placeholder so isinstance() checks stay valid
        pass


def layout_class(name: str):
    """The kitchen layout class registered as ``name``, or None when this kitchen build lacks it."""
    if kitchen_tensor is None:
        return None
    return getattr(kitchen_tensor, name, None)


def missing_layout_reason(name: str) -> str:
    if kitchen_tensor is None:
        return f"comfy-kitchen is not importable ({unavailable_reason})"
    return f"this comfy-kitchen build has no {name}"


def as_parameter(qt) -> torch.nn.Parameter:
    """A parameter holding ``qt``'s own tensors (nothing copied).

    ``Parameter(qt)`` would detach it, and kitchen's detach clones every layout tensor: that costs a
    copy of the whole weight per call (LoRA patching rebinds every patched weight) and breaks tensor
    sharing between siblings (q/k/v). For a tensor subclass a parameter is an instance of that
    subclass marked ``_is_param`` (what ``Parameter.__new__`` returns for one), so make a new wrapper
    around the same tensors and mark it.
    """
    p = QuantizedTensor(qt._qdata, qt._layout_cls, qt._params)
    p._is_param = True
    return p

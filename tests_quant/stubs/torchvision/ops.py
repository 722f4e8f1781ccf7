"""Stand-in for `torchvision.ops` (see tests_quant/stubs/_stand_in.py)."""
from _stand_in import module_getattr, stand_in

roi_align = stand_in("torchvision.ops.roi_align")
__getattr__ = module_getattr(__name__)

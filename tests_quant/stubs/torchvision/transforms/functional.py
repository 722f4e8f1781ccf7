"""Stand-in for `torchvision.transforms.functional` (see tests_quant/stubs/_stand_in.py)."""
from _stand_in import module_getattr

__getattr__ = module_getattr(__name__)

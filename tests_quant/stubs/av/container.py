"""Stand-in for `av.container` (see tests_quant/stubs/_stand_in.py)."""
from _stand_in import module_getattr, stand_in

InputContainer = stand_in("av.container.InputContainer")
__getattr__ = module_getattr(__name__)

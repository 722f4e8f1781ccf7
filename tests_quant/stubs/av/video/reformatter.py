"""Stand-in for `av.video.reformatter` (see tests_quant/stubs/_stand_in.py)."""
from _stand_in import module_getattr, stand_in

ColorRange = stand_in("av.video.reformatter.ColorRange")
__getattr__ = module_getattr(__name__)

"""Stand-in for `torchaudio.transforms` (see tests_quant/stubs/_stand_in.py)."""
from _stand_in import module_getattr, stand_in

MelScale = stand_in("torchaudio.transforms.MelScale")
__getattr__ = module_getattr(__name__)

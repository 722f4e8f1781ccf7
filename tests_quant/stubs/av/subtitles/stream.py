"""Stand-in for `av.subtitles.stream` (see tests_quant/stubs/_stand_in.py)."""
from _stand_in import module_getattr, stand_in

SubtitleStream = stand_in("av.subtitles.stream.SubtitleStream")
__getattr__ = module_getattr(__name__)

"""``python -m comfy.quant <command>``: the int4 tools (quantize, inspect, ...) live in ``comfy.quant_tools``,
which ships with the project's repository, not with ComfyUI."""
import sys

try:
    from comfy.quant_tools.cli import main
except ModuleNotFoundError as e:
    if e.name not in ("comfy.quant_tools", "comfy.quant_tools.cli"):
        raise
    sys.exit("error: the int4 tools are not installed in this ComfyUI; run 'python3 -m comfy.quant' from the "
             "int4 project's repository (it works on this ComfyUI's files and models)")
sys.exit(main())

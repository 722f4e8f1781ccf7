"""The int4 project's tools: the offline quantizer and the ``python -m comfy.quant`` commands (inspect,
lora-check, convert-nunchaku, quantize, bench, demo, install-comfyui).

They import the runtime package ``comfy.quant`` and are never installed into ComfyUI.
"""

"""Native int4 (SVDQuant W4A4, AWQ W4A16) support: formats, loading, Nunchaku conversion at load, LoRA deltas.

The run-time part that goes into ComfyUI; it depends only on torch, comfy-kitchen and safetensors (Triton
optional, for the GPU kernels). The tools (quantizer, CLI, bench, demo, installer) are ``comfy.quant_tools``.
"""

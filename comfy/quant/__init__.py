"""Native int4 (SVDQuant W4A4, AWQ W4A16) support: formats, loading, LoRA deltas, tools.

Depends only on torch, comfy-kitchen and safetensors, so it can move into upstream ComfyUI as is.
"""

"""A ComfyUI-core-shaped package carrying native int4 (SVDQuant W4A4, AWQ W4A16) support."""

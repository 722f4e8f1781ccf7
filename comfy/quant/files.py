"""Opening safetensors files so that an unreadable one is an error naming it."""
from __future__ import annotations

import contextlib
import os
import struct

import safetensors

from comfy.quant.errors import UnreadableFileError


def raise_if_unreadable(path, error: Exception) -> None:
    """Raise ``UnreadableFileError`` naming ``path`` when ``error``, raised while opening or reading a
    safetensors file, says the file cannot be read (missing, a directory, truncated, a corrupt header);
    any other error is left to the caller. Upstream's ``load_torch_file`` calls it in its handler."""
    if os.path.isdir(path):
        raise UnreadableFileError(path, "it is a directory") from None
    if isinstance(error, FileNotFoundError):
        raise UnreadableFileError(path, "no such file") from None
    if isinstance(error, (safetensors.SafetensorError, OSError, ValueError, KeyError, struct.error)):
        raise UnreadableFileError(path, str(error) or type(error).__name__) from None


@contextlib.contextmanager
def open_checked(path, device: str = "cpu"):
    """``safetensors.safe_open(path)`` whose failures (missing, a directory, truncated, corrupt header)
    are ``UnreadableFileError`` naming ``path``; errors raised inside the block pass through unchanged."""
    try:
        handle = safetensors.safe_open(str(path), framework="pt", device=str(device))
    except (safetensors.SafetensorError, OSError, ValueError, KeyError, struct.error) as e:
        raise_if_unreadable(path, e)
        raise
    with handle as f:
        yield f

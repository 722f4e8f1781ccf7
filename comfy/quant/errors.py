"""The errors this package raises about its inputs: one hierarchy, each naming what it can of the file,
the layer, the tensor, what was expected and what came.

``QuantFileError`` is the base (a ``ValueError``, so hosts that catch ``ValueError`` keep working).
The file is often known only to the caller (a loader reads a state dict, not a path): it attaches it
with ``with_file`` and re-raises the same object, so the type survives and the message gains the path.
"""
from __future__ import annotations


class QuantFileError(ValueError):
    def __init__(self, what: str, *, file=None, layer=None, tensor=None, expected=None, got=None):
        self.what, self.file = what, None if file is None else str(file)
        self.layer, self.tensor, self.expected, self.got = layer, tensor, expected, got
        super().__init__(what)

    def with_file(self, file) -> QuantFileError:
        """This error, naming ``file`` (kept when a file is already named)."""
        if self.file is None:
            self.file = str(file)
        return self

    def __str__(self) -> str:
        return f"{self.file}: {self.what}" if self.file else self.what


class QuantizedLayerError(QuantFileError):
    """A quantized layer's tensors or JSON are not what its format needs."""

    def __init__(self, layer: str, tensor: str, expected, got, *, file=None):
        super().__init__(f"quantized layer '{layer}': {tensor}: expected {expected}, got {got}", file=file,
                         layer=layer, tensor=tensor, expected=expected, got=got)


class UnreadableFileError(QuantFileError):
    """A file that cannot be read as safetensors: missing, a directory, truncated or corrupt."""

    def __init__(self, file, why: str):
        super().__init__(f"cannot read as safetensors: {why}", file=file)

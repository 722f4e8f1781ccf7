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


class MetadataError(QuantFileError):
    """File-level metadata (``config``, ``_quantization_metadata``, a layer's JSON) that does not parse,
    is out of bounds, or does not agree with the tensors; ``tensor`` names the metadata entry."""

    def __init__(self, entry: str, expected, got, *, file=None, layer=None):
        where = f"quantized layer '{layer}': {entry}" if layer else f"metadata '{entry}'"
        super().__init__(f"{where}: expected {expected}, got {got}", file=file, layer=layer, tensor=entry,
                         expected=expected, got=got)


class IncompleteModelError(QuantFileError):
    """A file that does not hold every tensor of the model it describes, or holds tensors of modules the
    model does not have: the model is not returned."""

    def __init__(self, missing, unexpected, *, file=None):
        missing, unexpected = sorted(missing), sorted(unexpected)
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) for modules the model does not have ({_listed(unexpected)})")
        super().__init__("incomplete int4 model: " + "; ".join(parts) + "; nothing was loaded", file=file,
                         tensor=(missing or unexpected or [None])[0], expected="every tensor of the model",
                         got=f"{len(missing)} missing, {len(unexpected)} unexpected")
        self.missing, self.unexpected = missing, unexpected


class LoraError(QuantFileError):
    """A LoRA (or its strength) that cannot be applied at all; single patches that cannot apply are
    refused and reported instead, so the rest of the LoRA still applies."""


class OutputFileError(QuantFileError):
    """An output path a command must not write: the input itself, an existing file without ``--force``,
    a directory, or a folder that does not exist."""


class QuantizeInputError(QuantFileError):
    """An input ``quantize`` cannot use, found before any work: not a supported architecture, a Nunchaku or an
    already-quantized file, linear weights that are not float or not shaped for int4, or a calibration
    file that does not fit the model."""


def _listed(keys, n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … {len(keys) - n} more" if len(keys) > n else "")

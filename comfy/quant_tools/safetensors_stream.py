"""Write a safetensors file tensor by tensor, so converting a 20B-parameter model never holds it whole.

The header goes last, into a region reserved up front (an upper bound of its size) and padded with
spaces, which the safetensors format allows. ``streaming_file`` writes to ``<path>.<random>.partial``
(a new name each run, so a stale one is never reused) and renames it only on success, so a failure
leaves no output behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import secrets
import stat
import struct

import torch

from comfy.quant.errors import OutputFileError

_TORCH_TO_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                   ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _TORCH_TO_ST_DTYPE[getattr(torch, _name)] = _st


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor with bounded memory.

    The header goes last, into a region reserved up front (an upper bound of its size) and padded
    with spaces, which the safetensors format allows.
    """

    def __init__(self, path: str, header_reserve: int, f=None):
        self.path = path
        self.reserve = int(math.ceil(header_reserve / 8) * 8)
        self.entries: dict = {}
        self.offset = 0
        self.f = open(path, "wb") if f is None else f
        self.f.seek(8 + self.reserve)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"duplicate output tensor name '{name}'")
        st_dtype = _TORCH_TO_ST_DTYPE.get(tensor.dtype)
        if st_dtype is None:
            raise ValueError(f"tensor '{name}': dtype {tensor.dtype} cannot be written to safetensors")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self.f.write(ctypes.string_at(t.data_ptr(), nbytes))
        self.entries[name] = {"dtype": st_dtype, "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes

    def finish(self, metadata: dict) -> None:
        header = {"__metadata__": metadata, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.reserve:
            raise RuntimeError(f"safetensors header ({len(raw)} bytes) exceeds the reserved {self.reserve} bytes")
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.reserve))
        self.f.write(raw + b" " * (self.reserve - len(raw)))
        self.f.close()

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()


def entry_bound(name: str, ndim: int) -> int:
    """Upper bound of one tensor's header entry: fixed JSON < 120 bytes plus 21 per dimension."""
    return len(json.dumps(name)) + 120 + 21 * max(1, ndim)


def check_output(in_path, out_path, what: str, overwrite: bool = False) -> None:
    """Raise ``OutputFileError`` when ``out_path`` must not be written; call it before any work.

    ``what`` is the command (``quantize``, ``convert-nunchaku``). Refused: the input itself (resolved
    paths: symlinks to the file or a directory above it, ``..``, relative spellings; and
    ``os.path.samefile`` for hard links and case-insensitive file systems), a directory, a folder that
    does not exist, a symbolic link, anything else that is not a regular file (a device, a FIFO, a
    socket; even with ``overwrite``), and an existing file unless ``overwrite``. The writer renames its
    temporary file onto ``out_path`` at the end, which would replace whatever is there.
    """
    same = os.path.realpath(in_path) == os.path.realpath(out_path)
    if not same and os.path.exists(out_path):
        try:
            same = os.path.samefile(in_path, out_path)
        except OSError:  # the input cannot be stat'ed: not the same file; opening it reports the problem
            same = False
    if same:
        raise OutputFileError(f"{what}: output is the same file as the input '{in_path}'; refusing to overwrite "
                              "the input (choose another output path)", file=out_path)
    if os.path.islink(out_path):
        raise OutputFileError(f"{what}: output is a symbolic link (to '{os.readlink(out_path)}'); refusing to "
                              "replace it (give the path of the file itself)", file=out_path)
    if os.path.isdir(out_path):
        raise OutputFileError(f"{what}: output is a directory; give a file path", file=out_path)
    if os.path.exists(out_path) and not stat.S_ISREG(os.stat(out_path).st_mode):
        raise OutputFileError(f"{what}: output is not a regular file (a device, FIFO or socket); refusing to "
                              "replace it, even with --force", file=out_path)
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise OutputFileError(f"{what}: the output's folder {parent} does not exist", file=out_path)
    if os.path.exists(out_path) and not overwrite:
        raise OutputFileError(f"{what}: output exists; refusing to replace it (--force to overwrite)", file=out_path)


def _new_partial(path: str):
    """``(name, file)``: a new ``<path>.<random>.partial`` opened for writing, created with the mode an
    ordinary save gives (0666 less the umask); never an existing file, so a stale one is never reused."""
    while True:
        tmp = f"{path}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")


@contextlib.contextmanager
def streaming_file(path: str, header_reserve: int):
    """Yield a writer for ``path``; the caller must call ``writer.finish(metadata)`` before leaving.

    The writer writes a new temporary file beside ``path`` (``_new_partial``), renamed onto ``path`` on
    success and removed on any failure, ``KeyboardInterrupt`` and the CLI's SIGTERM / SIGHUP included."""
    tmp, f = _new_partial(path)
    writer = StreamingSafetensorsWriter(tmp, header_reserve, f)
    try:
        yield writer
        if not writer.f.closed:
            raise RuntimeError(f"{path}: writer left without finish()")
        os.replace(tmp, path)
    except BaseException:
        writer.abort()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise

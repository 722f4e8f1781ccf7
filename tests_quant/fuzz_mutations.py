"""Hypothesis strategies that describe one mutation of a valid file, and the functions that apply them.

A mutation is plain data (a tuple), so hypothesis can shrink it and a failure prints what was done:

* file bytes: ``("truncate", f)``, ``("flip_header", f, xor)``, ``("flip_data", f, xor)``, ``("header_len", n)``
  (``f`` in [0, 1) places the edit within the region);
* tensors and metadata (``tensor_mutations(sd, meta)``): ``("drop", key)``, ``("stray", key)``,
  ``("shape", key, how)``, ``("dtype", key, dtype name)``, ``("value", key, f, value)``,
  ``("layer_json", key, value)``, ``("meta_json", entry, text)``, ``("stray_slot", key, name)`` (a tensor
  ``<layer>.<name>`` beside a quantized layer's own: an unknown ``weight_*`` suffix or another format's);
* outputs (``output_cases()``): ``(kind, force)``, an output path that is a FIFO, a symlink (to a file or
  dangling), a directory, an existing file, in a missing folder, or the input; ``interrupts()``: where a
  write is cut (``(kind, f)``: an exception, ``KeyboardInterrupt`` or the CLI's ``Terminated``, at a fraction
  ``f`` of the tensors written).
"""
from __future__ import annotations

import json
import os
import math
import struct

import torch
from hypothesis import strategies as st

DTYPES = ("int8", "uint8", "int32", "float16", "bfloat16", "float32", "bool")
VALUES = (math.nan, math.inf, -math.inf, 0.0, 1e30, -1e30, 255.0)
SHAPES = ("row_less", "row_more", "flatten", "unsqueeze", "scalar", "empty")


# ------------------------------------------------------------------------------------------ bytes
def byte_mutations():
    frac = st.floats(0, 1, exclude_max=True)
    return st.one_of(
        st.tuples(st.just("truncate"), frac),
        st.tuples(st.just("flip_header"), frac, st.integers(1, 255)),
        st.tuples(st.just("flip_data"), frac, st.integers(1, 255)),
        st.tuples(st.just("header_len"), st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(0, 4096))),
    )


def apply_byte_mutation(data: bytes, mutation) -> bytes:
    kind = mutation[0]
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    if kind == "truncate":
        return data[: int(mutation[1] * len(data))]
    if kind == "header_len":
        return struct.pack("<Q", mutation[1]) + data[8:]
    lo, hi = (8, header_end) if kind == "flip_header" else (header_end, len(data))
    pos = lo + int(mutation[1] * (hi - lo))
    return data[:pos] + bytes([data[pos] ^ mutation[2]]) + data[pos + 1:]


# ---------------------------------------------------------------------------------------- tensors
def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
    return st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), c, max_size=3)),
                        max_leaves=8)


def _layer_json_edits():
    """A layer JSON object with one field forged (or an arbitrary JSON value)."""
    fields = st.sampled_from(("format", "rank", "group_size", "act_unsigned"))
    forged = st.tuples(fields, json_values()).map(lambda fv: {"__edit__": fv})
    return st.one_of(forged, json_values(), st.integers(1, 200).map(lambda n: "[" * n + "]" * n))


def tensor_mutations(sd: dict, meta: dict, values=VALUES):
    keys = st.sampled_from(sorted(sd))
    quant_keys = sorted(k for k in sd if k.endswith(".comfy_quant")) or sorted(sd)
    entries = st.sampled_from(sorted(meta) + ["config", "_quantization_metadata"])
    meta_text = st.one_of(json_values().map(json.dumps), st.text(max_size=20),
                          st.integers(1, 3000).map(lambda n: "{\"a\":" * n + "1" + "}" * n))
    frac = st.floats(0, 1, exclude_max=True)
    return st.one_of(
        st.tuples(st.just("drop"), keys),
        st.tuples(st.just("stray"), keys),
        st.tuples(st.just("shape"), keys, st.sampled_from(SHAPES)),
        st.tuples(st.just("dtype"), keys, st.sampled_from(DTYPES)),
        st.tuples(st.just("value"), keys, frac, st.sampled_from(values)),
        st.tuples(st.just("layer_json"), st.sampled_from(quant_keys), _layer_json_edits()),
        st.tuples(st.just("meta_json"), entries, meta_text),
        st.tuples(st.just("stray_slot"), st.sampled_from(quant_keys), st.sampled_from(STRAY_SLOTS)),
    )


STRAY_SLOTS = ("weight_foo", "weight_zeros", "weight_proj_down", "weight_smooth_factor", "weight_extra_scale")
OUTPUT_KINDS = ("new", "fifo", "symlink_file", "symlink_dangling", "directory", "existing", "missing_folder",
                "the_input")


def output_cases():
    return st.tuples(st.sampled_from(OUTPUT_KINDS), st.booleans())


def interrupts():
    return st.tuples(st.sampled_from(("KeyboardInterrupt", "Terminated", "OSError")), st.floats(0, 1, exclude_max=True))


def strengths():
    """LoRA strengths: in range, at the limit, and the ones a loader must refuse."""
    return st.one_of(st.sampled_from((math.nan, math.inf, -math.inf, 1e30, 101.0, -100.0, 100.0, 0.0)),
                     st.floats(-100, 100))


def _reshaped(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "row_less":
        return t[:-1].clone() if t.dim() and t.shape[0] > 1 else t.reshape(-1)[:0].clone()
    if how == "row_more":
        return torch.cat([t, t[:1]]) if t.dim() else t.reshape(1).repeat(2)
    if how == "flatten":
        return t.reshape(-1).clone()
    if how == "unsqueeze":
        return t.unsqueeze(0).clone()
    if how == "scalar":
        return t.reshape(-1)[:1].reshape(()).clone() if t.numel() else torch.zeros(())
    return t.reshape(-1)[:0].clone()


def _with_value(t: torch.Tensor, frac: float, value: float) -> torch.Tensor:
    t = t.clone()
    if not t.numel():
        return t
    flat = t.view(-1)
    pos = int(frac * flat.numel())
    if t.is_floating_point():
        flat[pos] = value
    elif t.dtype == torch.bool:
        flat[pos] = not bool(flat[pos])
    else:
        info = torch.iinfo(t.dtype)
        flat[pos] = int(max(info.min, min(info.max, 0 if math.isnan(value) else max(-1e18, min(1e18, value)))))
    return t


def _layer_json(t: torch.Tensor, edit) -> torch.Tensor:
    if isinstance(edit, dict) and "__edit__" in edit:
        try:
            conf = json.loads(bytes(t.tolist()).decode("utf-8")) if t.dtype == torch.uint8 else {}
        except ValueError:
            conf = {}
        field, value = edit["__edit__"]
        if isinstance(conf, dict):
            conf[field] = value
        text = json.dumps(conf)
    else:
        text = edit if isinstance(edit, str) else json.dumps(edit)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def apply_tensor_mutation(sd: dict, meta: dict, mutation) -> None:
    """Apply ``mutation`` to ``sd`` / ``meta`` in place."""
    kind, key = mutation[0], mutation[1]
    if kind == "drop":
        del sd[key]
    elif kind == "stray":
        module = key.rpartition(".")[0] or "x"
        sd[module + ".zz_stray.weight"] = torch.zeros(2, 2)
    elif kind == "shape":
        sd[key] = _reshaped(sd[key], mutation[2])
    elif kind == "dtype":
        t = sd[key]
        sd[key] = t.to(getattr(torch, mutation[2]))
    elif kind == "value":
        sd[key] = _with_value(sd[key], mutation[2], mutation[3])
    elif kind == "layer_json":
        sd[key] = _layer_json(sd[key], mutation[2])
    elif kind == "meta_json":
        meta[key] = mutation[2]
    elif kind == "stray_slot":
        layer = key[: -len(".comfy_quant")] if key.endswith(".comfy_quant") else key.rpartition(".")[0]
        sd.setdefault(f"{layer}.{mutation[2]}", torch.zeros(4, dtype=torch.bfloat16))


def make_output(kind, d, src):
    """``(output path, input path)`` for output-path ``kind`` (a FIFO, a symlink to a file or to nowhere, a
    directory, an existing file, the input itself, a missing folder, a new file) made in folder ``d``."""
    out = d / "out" / "o.safetensors" if kind == "missing_folder" else d / "o.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink_file":
        (d / "target.safetensors").write_bytes(b"target")
        out.symlink_to(d / "target.safetensors")
    elif kind == "symlink_dangling":
        out.symlink_to(d / "nowhere.safetensors")
    elif kind == "directory":
        out.mkdir()
    elif kind == "existing":
        out.write_bytes(b"earlier")
    elif kind == "the_input":
        out.write_bytes(src.read_bytes())
        return out, out
    return out, src

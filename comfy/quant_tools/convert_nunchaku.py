"""``convert-nunchaku``: a Nunchaku checkpoint converted to ComfyUI-native int4 on disk, module by module.

The conversion itself is the loader's (``comfy.quant.nunchaku``); this module streams it to a file.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Mapping

from comfy.quant.errors import QuantFileError
from comfy.quant.files import open_checked
from comfy.quant.nunchaku import (NunchakuConversionError, Plan, build_plan, convert_unit, is_native_int4,
                                  is_nunchaku_checkpoint, log_summary, output_metadata, progress_bar)
from comfy.quant_tools.safetensors_stream import check_output, entry_bound, streaming_file


def _header_bound(plan: Plan, get_shape: Callable[[str], tuple], metadata_sizes: int) -> int:
    """Upper bound of the output header: every input key yields at most 3 outputs whose names are at
    most 32 bytes longer; quantized modules add comfy_quant entries and their _quantization_metadata line."""
    total = metadata_sizes + 4096
    for unit in plan.units:
        fan = max(1, len(unit.out_names))
        for key in unit.input_keys():
            total += fan * (entry_bound(key, len(get_shape(key))) + 32)
        if unit.kind != "float":
            longest = max(len(json.dumps(n)) for n in (unit.name, *unit.out_names))
            total += fan * 2 * (longest + 32 + 240)
    return total


def _not_nunchaku(in_path, keys: list[str], metadata: Mapping) -> NunchakuConversionError:
    """The refusal of a file that is no Nunchaku checkpoint, saying what it is instead."""
    if is_native_int4(keys, metadata):
        marked = sum(k.endswith(".comfy_quant") for k in keys)
        got = (f"a ComfyUI-native int4 checkpoint ({marked} layers with comfy_quant)" if marked else
               "a ComfyUI-native int4 checkpoint (layers listed in _quantization_metadata)")
        why = ("already native int4 (already converted, quantized, or in PR #13580's key spellings): "
               "load it as it is")
    else:
        got = "no Nunchaku tensors (.qweight, .wscales, ...) or metadata (model_class, quantization_config)"
        why = "not a Nunchaku checkpoint (a float model?)"
    return NunchakuConversionError(f"convert-nunchaku: {why}; expected a Nunchaku SVDQuant checkpoint, got {got}",
                                   file=in_path, expected="a Nunchaku SVDQuant checkpoint", got=got)


def convert_nunchaku_file(in_path: str, out_path: str, progress: bool = True, overwrite: bool = False) -> dict:
    """Convert a Nunchaku ``.safetensors`` file to ComfyUI's native int4 layout on disk.

    Reads module by module through ``safe_open`` and writes each converted tensor straight to
    ``out_path`` (via a new ``<out_path>.<random>.partial``, renamed at the end), so memory holds one module at a
    time; on any failure nothing is left at ``out_path``. Refused before any work: an output that
    ``check_output`` refuses (an existing file unless ``overwrite``), an unreadable input
    (``UnreadableFileError``) and a file that is no Nunchaku checkpoint. Errors about the input name
    ``in_path``. Returns the output file's metadata.
    """
    check_output(in_path, out_path, "convert-nunchaku", overwrite=overwrite)
    with open_checked(in_path) as f:
        try:
            return _convert_open_file(f, in_path, out_path, progress)
        except QuantFileError as e:
            raise e.with_file(in_path)


def _convert_open_file(f, in_path: str, out_path: str, progress: bool) -> dict:
    metadata = dict(f.metadata() or {})
    keys = list(f.keys())
    if not is_nunchaku_checkpoint(keys, metadata):
        raise _not_nunchaku(in_path, keys, metadata)
    shapes = {}

    def get_shape(key: str) -> tuple:
        if key not in shapes:
            shapes[key] = tuple(f.get_slice(key).get_shape())
        return shapes[key]

    plan = build_plan(keys, metadata, get_shape)
    # the output repeats model_class / quantization_config (escaped, inside converted_from) once more
    meta_size = 3 * sum(len(json.dumps(k)) + len(json.dumps(v)) + 8 for k, v in metadata.items())
    layers: dict = {}
    bar = progress_bar(len(plan.units), progress, f"Converting {os.path.basename(in_path)}")
    try:
        with streaming_file(out_path, _header_bound(plan, get_shape, meta_size)) as writer:
            for unit in plan.units:
                tensors = [{canon: f.get_tensor(key) for canon, key in src.keys.items()} for src in unit.sources]
                out, lay = convert_unit(unit, tensors, plan)
                del tensors
                for name, tensor in out:
                    writer.add(name, tensor)
                del out
                layers.update(lay)
                if bar is not None:
                    bar.update(1)
            out_meta = output_metadata(plan, layers)
            writer.finish(out_meta)
    finally:
        if bar is not None:
            bar.close()
    log_summary(plan, layers)
    return out_meta

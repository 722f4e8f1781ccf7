"""The architectures this package quantizes and converts, as tables: one place for every name and layer fact.

One frozen :class:`Architecture` per model family (:data:`QWEN_IMAGE`, :data:`ZIMAGE`, :data:`FLUX`). Each says

* how to recognise it: substrings of a Nunchaku file's ``model_class`` metadata (lower case), regexes of
  keys only a Nunchaku file of it has, and regexes of keys a ComfyUI-layout file of it has (all must
  match some key, none of ``comfy_exclude``);
* its block kinds (:class:`BlockKind`): the ComfyUI prefix and the Nunchaku prefix of a block (templates
  with ``{}`` for the block index, and the regexes made from them);
* the **ComfyUI-side layer table** of each block kind, ``layers``: module path relative to the block ->
  :class:`Layer` (kind ``"svdquant"`` | ``"awq"`` | ``"float"``, ``act_unsigned``, AWQ interleave ``S`` and
  the scale slots whose ``+1`` Nunchaku folds into the bias, ``in_splits``), and ``share``: the groups of
  modules quantized jointly because they read one input (one ``smooth_factor`` and ``proj_down``; ordered
  as Nunchaku fuses them). The offline quantizer reads these;
* the **Nunchaku-side table** of each block kind, ``modules``: Nunchaku module (relative to the block) ->
  :class:`NunchakuModule` (ComfyUI target(s) and how: ``keep`` | ``split rows`` | ``concat rows`` |
  ``concat K``), plus the float renames (:class:`FloatRule`, per block and top level, and top-level module
  prefix ``renames``). Float keys no rule names are kept as they are. The Nunchaku converter reads these.

Facts: ``shared/specs/nunchaku-format.md`` §5-6 and upstream ComfyUI's model code (names only).

Decisions
---------
* Qwen-Image: Nunchaku's fused ``attn.to_qkv`` / ``attn.add_qkv_proj`` are split by output rows into
  ComfyUI's separate ``to_q/k/v`` (sharing ``proj_down`` and ``smooth_factor``).
* Z-Image: ``attention.to_qkv`` stays fused as ComfyUI's NextDiT holds it (``attention.qkv``);
  ``feed_forward.net.0.proj`` is **[w3; w1]** and is split by rows into ``w3`` (rows 0..F) and ``w1``
  (rows F..2F), sharing ``proj_down`` / ``smooth_factor``. ``adaLN_modulation`` stays float. The refiners
  are float in Nunchaku's releases (``skip_refiners``; ``BlockKind.released_float``), in diffusers layout.
* Flux.1: single-block ``linear1`` = ``qkv_proj`` + ``mlp_fc1`` concatenated on the output axis (one layer
  of rank 2R: ``proj_down`` side by side, ``proj_up`` block-diagonal, the shared smooth factor);
  ``linear2`` = ``out_proj`` + ``mlp_fc2`` concatenated along K (one layer of rank 2R: block-diagonal
  ``proj_down``, ``proj_up`` side by side, biases summed) whose JSON carries ``act_unsigned: [false, true]``
  and ``in_splits: [dim, mlp]``: the one fact that cannot be concatenated is kept per input segment.
  ComfyUI's own module names stay, so ComfyUI's LoRA key maps address them unchanged.
  Modulation: AWQ, S = 6 in double blocks (``img_mod.lin`` / ``txt_mod.lin``), S = 3 in single blocks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Iterable, Mapping

__all__ = [
    "SVDQUANT", "AWQ", "FLOAT", "KEEP", "SPLIT_ROWS", "CONCAT_ROWS", "CONCAT_K", "SWAP_HALVES", "ATTENTION_MLP",
    "Layer", "NunchakuModule", "FloatRule", "BlockKind", "Architecture",
    "QWEN_IMAGE", "ZIMAGE", "FLUX", "ARCHITECTURES", "get", "from_model_class", "from_nunchaku_keys",
    "from_comfy_keys",
]

# layer kinds (ComfyUI side)
SVDQUANT = "svdquant"
AWQ = "awq"
FLOAT = "float"
# how Nunchaku tensors become ComfyUI ones
KEEP = "keep"                # one to one (a rename at most)
SPLIT_ROWS = "split rows"    # one source split by output rows into the targets, in order, equal parts
CONCAT_ROWS = "concat rows"  # sources concatenated on the output axis, in part order
CONCAT_K = "concat K"        # sources concatenated on the input axis, in part order
SWAP_HALVES = "swap halves"  # float only: [a; b] -> [b; a] on the first axis
# Layer.in_splits values
ATTENTION_MLP = "attention+mlp"  # K = N (attention output, N = out_features) + K - N (MLP activations)


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Layer:
    """A ComfyUI-side linear of a block, by how it is stored in an int4 file.

    ``act_unsigned``: the W4A4 main path quantizes the activations unsigned (after a GELU); a tuple gives
    one value per input segment of ``in_splits``. ``interleave`` / ``scale_slots`` (AWQ modulation): the
    output interleave ``S`` of Nunchaku's files and the output chunks that are the ``scale`` of
    ``(1 + scale)`` (Nunchaku folds the ``+1`` into their bias; ComfyUI adds it itself). ``in_splits``:
    ``None`` or :data:`ATTENTION_MLP` (see :meth:`input_splits`)."""

    kind: str
    act_unsigned: bool | tuple[bool, ...] = False
    interleave: int = 0
    scale_slots: tuple[int, ...] = ()
    in_splits: str | None = None

    def input_splits(self, out_features: int, in_features: int) -> tuple[int, ...] | None:
        """The widths of the input segments (summing to ``in_features``), or None for a plain layer."""
        if self.in_splits is None:
            return None
        if self.in_splits == ATTENTION_MLP:
            return (out_features, in_features - out_features)
        raise ValueError(f"unknown in_splits rule {self.in_splits!r}")


@dataclass(frozen=True)
class NunchakuModule:
    """A quantized module of a Nunchaku file (path relative to its block) and the ComfyUI layer(s) it makes.

    ``how``: :data:`KEEP` (``targets`` has one layer), :data:`SPLIT_ROWS` (equal row blocks, one per target,
    in order; ``inner_rows``: each block must have inner-dim rows, as fused q/k/v), :data:`CONCAT_ROWS` /
    :data:`CONCAT_K` (this module is part ``part`` of ``parts`` of the one target). The kind, signedness
    and AWQ interleave come from the target's :class:`Layer`."""

    targets: tuple[str, ...]
    how: str = KEEP
    part: int = 0
    parts: int = 1
    inner_rows: bool = False


@dataclass(frozen=True)
class FloatRule:
    """Unquantized tensors: Nunchaku/diffusers ``sources`` -> ComfyUI ``targets`` (keys; relative to the
    block in ``BlockKind.floats``). ``how``: :data:`KEEP` (a rename), :data:`CONCAT_ROWS` (sources -> one
    target), :data:`SPLIT_ROWS` (one source -> equal row blocks), :data:`SWAP_HALVES`."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    how: str = KEEP


def _prefix_re(template: str) -> re.Pattern:
    head, _, tail = template.partition("{}")
    return re.compile(rf"^(?P<block>{re.escape(head)}(?P<index>\d+){re.escape(tail)})\.(?P<rel>.+)$")


@dataclass(frozen=True, eq=False)
class BlockKind:
    """One kind of transformer block: where its blocks are and what their layers are.

    ``comfy_prefix`` / ``nunchaku_prefix``: templates with ``{}`` for the block index (``comfy_re`` /
    ``nunchaku_re`` match ``<block>.<rel>`` with groups ``block``, ``index``, ``rel``). ``layers``: the
    ComfyUI-side table (modules not listed are float); ``share``: modules quantized jointly. ``modules``:
    the Nunchaku-side table; ``floats``: float rules relative to the block. ``released_float``: Nunchaku's
    released files keep these blocks unquantized (Z-Image's refiners, ``skip_refiners``)."""

    name: str
    comfy_prefix: str
    nunchaku_prefix: str
    layers: Mapping[str, Layer]
    modules: Mapping[str, NunchakuModule]
    share: tuple[tuple[str, ...], ...] = ()
    floats: tuple[FloatRule, ...] = ()
    released_float: bool = False

    @cached_property
    def comfy_re(self) -> re.Pattern:
        return _prefix_re(self.comfy_prefix)

    @cached_property
    def nunchaku_re(self) -> re.Pattern:
        return _prefix_re(self.nunchaku_prefix)

    def comfy_block(self, index: int | str) -> str:
        return self.comfy_prefix.format(index)

    def quantized(self) -> dict[str, Layer]:
        """The int4 layers (SVDQuant and AWQ) of the ComfyUI-side table."""
        return {rel: layer for rel, layer in self.layers.items() if layer.kind != FLOAT}

    def share_group(self, rel: str) -> tuple[str, ...] | None:
        """The joint-quantization group holding ``rel``, or None."""
        for group in self.share:
            if rel in group:
                return group
        return None


@dataclass(frozen=True, eq=False)
class Architecture:
    """One model family. See the module docstring for the fields' meaning."""

    name: str                           # "qwen_image" | "zimage" | "flux"
    title: str                          # for messages
    model_class: str                    # Nunchaku's model_class of its files
    model_class_substrings: tuple[str, ...]
    nunchaku_keys: tuple[str, ...]      # regexes (re.search): any match -> a Nunchaku file of this family
    comfy_keys: tuple[str, ...]         # regexes (re.match): each must match a key of a ComfyUI-layout file
    blocks: tuple[BlockKind, ...]
    floats: tuple[FloatRule, ...] = ()  # top-level float rules (keys)
    renames: Mapping[str, str] = field(default_factory=dict)  # top-level Nunchaku module prefix -> ComfyUI
    comfy_exclude: tuple[str, ...] = ()  # regexes: a match means another family (Flux 2 for Flux)
    inner_dim_config: tuple[str, ...] = ()  # Nunchaku ``config`` fields whose product is the inner dim
    inner_dim_key: str | None = None    # Nunchaku-file key whose rows are the inner dim (no usable config)

    def comfy_layer(self, path: str) -> tuple[BlockKind, str, str, Layer] | None:
        """``(block kind, block prefix, rel, Layer)`` of a ComfyUI module path listed in a layer table."""
        for kind in self.blocks:
            m = kind.comfy_re.match(path)
            if m and m.group("rel") in kind.layers:
                return kind, m.group("block"), m.group("rel"), kind.layers[m.group("rel")]
        return None

    def comfy_block(self, path: str) -> tuple[BlockKind, str, str] | None:
        """``(block kind, block prefix, rel)`` of any ComfyUI key or module path inside a block."""
        for kind in self.blocks:
            m = kind.comfy_re.match(path)
            if m:
                return kind, m.group("block"), m.group("rel")
        return None

    def nunchaku_block(self, path: str) -> tuple[BlockKind, str, str, str] | None:
        """``(block kind, Nunchaku block prefix, ComfyUI block prefix, rel)`` of a Nunchaku key or module."""
        for kind in self.blocks:
            m = kind.nunchaku_re.match(path)
            if m:
                return kind, m.group("block"), kind.comfy_block(m.group("index")), m.group("rel")
        return None

    def matches_comfy(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        if any(re.match(p, k) for p in self.comfy_exclude for k in keys):
            return False
        return all(any(re.match(p, k) for k in keys) for p in self.comfy_keys)

    def matches_nunchaku(self, keys: Iterable[str]) -> bool:
        pats = [re.compile(p) for p in self.nunchaku_keys]
        return any(p.search(k) for k in keys for p in pats)


# =========================================================================================== Qwen-Image

_S = Layer(SVDQUANT)
_SU = Layer(SVDQUANT, act_unsigned=True)
_MOD6 = Layer(AWQ, interleave=6, scale_slots=(1, 4))   # shift, scale, gate, shift, scale, gate
_MOD3 = Layer(AWQ, interleave=3, scale_slots=(1,))     # shift, scale, gate
_F = Layer(FLOAT)

_QWEN_BLOCK = BlockKind(
    name="block",
    comfy_prefix="transformer_blocks.{}",
    nunchaku_prefix="transformer_blocks.{}",
    layers=_frozen({
        "attn.to_q": _S, "attn.to_k": _S, "attn.to_v": _S,
        "attn.add_q_proj": _S, "attn.add_k_proj": _S, "attn.add_v_proj": _S,
        "attn.to_out.0": _S, "attn.to_add_out": _S,
        "img_mlp.net.0.proj": _S, "txt_mlp.net.0.proj": _S,
        "img_mlp.net.2": _SU, "txt_mlp.net.2": _SU,
        "img_mod.1": _MOD6, "txt_mod.1": _MOD6,
    }),
    share=(("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    modules=_frozen({
        "attn.to_qkv": NunchakuModule(("attn.to_q", "attn.to_k", "attn.to_v"), SPLIT_ROWS, inner_rows=True),
        "attn.add_qkv_proj": NunchakuModule(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), SPLIT_ROWS,
                                            inner_rows=True),
        "attn.to_out.0": NunchakuModule(("attn.to_out.0",)),
        "attn.to_add_out": NunchakuModule(("attn.to_add_out",)),
        "img_mlp.net.0.proj": NunchakuModule(("img_mlp.net.0.proj",)),
        "txt_mlp.net.0.proj": NunchakuModule(("txt_mlp.net.0.proj",)),
        "img_mlp.net.2": NunchakuModule(("img_mlp.net.2",)),
        "txt_mlp.net.2": NunchakuModule(("txt_mlp.net.2",)),
        # already separate q/k/v (not in published files, harmless to accept)
        "attn.to_q": NunchakuModule(("attn.to_q",)), "attn.to_k": NunchakuModule(("attn.to_k",)),
        "attn.to_v": NunchakuModule(("attn.to_v",)),
        "attn.add_q_proj": NunchakuModule(("attn.add_q_proj",)), "attn.add_k_proj": NunchakuModule(("attn.add_k_proj",)),
        "attn.add_v_proj": NunchakuModule(("attn.add_v_proj",)),
        "img_mod.1": NunchakuModule(("img_mod.1",)), "txt_mod.1": NunchakuModule(("txt_mod.1",)),
    }),
)

QWEN_IMAGE = Architecture(
    name="qwen_image",
    title="Qwen-Image",
    model_class="NunchakuQwenImageTransformer2DModel",
    model_class_substrings=("qwenimage",),
    nunchaku_keys=(r"\.attn\.add_qkv_proj\.", r"\.img_mod\.1\."),
    comfy_keys=(r"^transformer_blocks\.\d+\.attn\.to_q\.weight$", r"^txt_norm\.weight$"),
    blocks=(_QWEN_BLOCK,),
    inner_dim_config=("num_attention_heads", "attention_head_dim"),
    inner_dim_key="img_in.weight",
)

# =========================================================================================== Z-Image

_ZIMAGE_LAYERS = _frozen({
    "attention.qkv": _S, "attention.out": _S,
    "feed_forward.w1": _S, "feed_forward.w3": _S, "feed_forward.w2": _S,   # w2 after SwiGLU: signed
    "adaLN_modulation.0": _F,
})
_ZIMAGE_MODULES = _frozen({
    "attention.to_qkv": NunchakuModule(("attention.qkv",)),
    "attention.to_out.0": NunchakuModule(("attention.out",)),
    "feed_forward.net.0.proj": NunchakuModule(("feed_forward.w3", "feed_forward.w1"), SPLIT_ROWS),  # [w3; w1]
    "feed_forward.net.2": NunchakuModule(("feed_forward.w2",)),
})
_ZIMAGE_BLOCK_FLOATS = (
    FloatRule(("attention.norm_q.weight",), ("attention.q_norm.weight",)),
    FloatRule(("attention.norm_k.weight",), ("attention.k_norm.weight",)),
    # float blocks in diffusers layout (the released files' refiners)
    FloatRule(("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight"),
              ("attention.qkv.weight",), CONCAT_ROWS),
    FloatRule(("attention.to_out.0.weight",), ("attention.out.weight",)),
    FloatRule(("feed_forward.net.0.proj.weight",), ("feed_forward.w3.weight", "feed_forward.w1.weight"), SPLIT_ROWS),
    FloatRule(("feed_forward.net.2.weight",), ("feed_forward.w2.weight",)),
)
_ZIMAGE_SHARE = (("feed_forward.w3", "feed_forward.w1"),)


def _zimage_block(name: str, released_float: bool) -> BlockKind:
    return BlockKind(name=name, comfy_prefix=name + ".{}", nunchaku_prefix=name + ".{}", layers=_ZIMAGE_LAYERS,
                     modules=_ZIMAGE_MODULES, share=_ZIMAGE_SHARE, floats=_ZIMAGE_BLOCK_FLOATS,
                     released_float=released_float)


ZIMAGE = Architecture(
    name="zimage",
    title="Z-Image",
    model_class="NunchakuZImageTransformer2DModel",
    model_class_substrings=("zimage",),
    nunchaku_keys=(r"\.attention\.to_qkv\.", r"\.feed_forward\.", r"^noise_refiner\.", r"^context_refiner\."),
    comfy_keys=(r"^cap_embedder\.1\.weight$", r"^layers\.\d+\.attention\.qkv\.weight$",
                r"^layers\.\d+\.adaLN_modulation\.0\.weight$"),
    blocks=(_zimage_block("layers", False), _zimage_block("noise_refiner", True),
            _zimage_block("context_refiner", True)),
    renames=_frozen({"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1": "final_layer"}),
    inner_dim_config=("dim",),
    inner_dim_key="all_x_embedder.2-1.weight",
)

# =========================================================================================== Flux.1

_FLUX_DOUBLE = BlockKind(
    name="double",
    comfy_prefix="double_blocks.{}",
    nunchaku_prefix="transformer_blocks.{}",
    layers=_frozen({
        "img_mod.lin": _MOD6, "txt_mod.lin": _MOD6,
        "img_attn.qkv": _S, "txt_attn.qkv": _S, "img_attn.proj": _S, "txt_attn.proj": _S,
        "img_mlp.0": _S, "txt_mlp.0": _S, "img_mlp.2": _SU, "txt_mlp.2": _SU,
    }),
    modules=_frozen({
        "norm1.linear": NunchakuModule(("img_mod.lin",)),
        "norm1_context.linear": NunchakuModule(("txt_mod.lin",)),
        "qkv_proj": NunchakuModule(("img_attn.qkv",)),
        "qkv_proj_context": NunchakuModule(("txt_attn.qkv",)),
        "out_proj": NunchakuModule(("img_attn.proj",)),
        "out_proj_context": NunchakuModule(("txt_attn.proj",)),
        "mlp_fc1": NunchakuModule(("img_mlp.0",)),
        "mlp_context_fc1": NunchakuModule(("txt_mlp.0",)),
        "mlp_fc2": NunchakuModule(("img_mlp.2",)),
        "mlp_context_fc2": NunchakuModule(("txt_mlp.2",)),
    }),
    floats=(
        FloatRule(("norm_q.weight",), ("img_attn.norm.query_norm.weight",)),
        FloatRule(("norm_k.weight",), ("img_attn.norm.key_norm.weight",)),
        FloatRule(("norm_added_q.weight",), ("txt_attn.norm.query_norm.weight",)),
        FloatRule(("norm_added_k.weight",), ("txt_attn.norm.key_norm.weight",)),
    ),
)

_FLUX_SINGLE = BlockKind(
    name="single",
    comfy_prefix="single_blocks.{}",
    nunchaku_prefix="single_transformer_blocks.{}",
    layers=_frozen({
        "modulation.lin": _MOD3,
        "linear1": _S,                                                   # [q; k; v; mlp], already fused
        "linear2": Layer(SVDQUANT, act_unsigned=(False, True), in_splits=ATTENTION_MLP),
    }),
    modules=_frozen({
        "norm.linear": NunchakuModule(("modulation.lin",)),
        "qkv_proj": NunchakuModule(("linear1",), CONCAT_ROWS, part=0, parts=2),
        "mlp_fc1": NunchakuModule(("linear1",), CONCAT_ROWS, part=1, parts=2),
        "out_proj": NunchakuModule(("linear2",), CONCAT_K, part=0, parts=2),
        "mlp_fc2": NunchakuModule(("linear2",), CONCAT_K, part=1, parts=2),
    }),
    floats=(
        FloatRule(("norm_q.weight",), ("norm.query_norm.weight",)),
        FloatRule(("norm_k.weight",), ("norm.key_norm.weight",)),
    ),
)

FLUX = Architecture(
    name="flux",
    title="Flux",
    model_class="NunchakuFluxTransformer2dModel",
    model_class_substrings=("flux",),
    nunchaku_keys=(r"^single_transformer_blocks\.", r"\.qkv_proj_context\.", r"\.norm1_context\.linear\."),
    comfy_keys=(r"^img_in\.weight$", r"^double_blocks\.\d+\.img_attn\.qkv\.weight$",
                r"^single_blocks\.\d+\.linear1\.weight$"),
    comfy_exclude=(r"^double_stream_modulation_img\.lin\.weight$",),   # Flux 2
    blocks=(_FLUX_DOUBLE, _FLUX_SINGLE),
    floats=(
        # diffusers' norm_out.linear is [scale; shift], ComfyUI's final_layer.adaLN_modulation.1 [shift; scale]
        FloatRule(("norm_out.linear.weight",), ("final_layer.adaLN_modulation.1.weight",), SWAP_HALVES),
        FloatRule(("norm_out.linear.bias",), ("final_layer.adaLN_modulation.1.bias",), SWAP_HALVES),
    ),
    renames=_frozen({
        "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "proj_out": "final_layer.linear",
    }),
    inner_dim_config=("num_attention_heads", "attention_head_dim"),
    inner_dim_key="x_embedder.weight",
)

ARCHITECTURES: tuple[Architecture, ...] = (QWEN_IMAGE, ZIMAGE, FLUX)
_BY_NAME = {a.name: a for a in ARCHITECTURES}


def get(name: str) -> Architecture:
    """The architecture called ``name`` (``qwen_image``, ``zimage``, ``flux``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(_BY_NAME)}") from None


def from_model_class(model_class: str) -> Architecture | None:
    """The architecture of a Nunchaku ``model_class`` metadata value, or None."""
    low = str(model_class).lower()
    for arch in ARCHITECTURES:
        if any(s in low for s in arch.model_class_substrings):
            return arch
    return None


def from_nunchaku_keys(keys: Iterable[str]) -> Architecture | None:
    """The architecture a Nunchaku file's key names show (checked in ``ARCHITECTURES`` order), or None."""
    keys = list(keys)
    for arch in ARCHITECTURES:
        if arch.matches_nunchaku(keys):
            return arch
    return None


def from_comfy_keys(keys: Iterable[str]) -> Architecture | None:
    """The architecture of a ComfyUI-layout state dict (float or int4) by its key names, or None."""
    keys = list(keys)
    for arch in ARCHITECTURES:
        if arch.matches_comfy(keys):
            return arch
    return None

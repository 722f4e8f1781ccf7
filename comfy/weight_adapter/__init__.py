"""Weight adapters read from LoRA files (mirrors upstream ``comfy/weight_adapter``)."""
from .base import WeightAdapterBase, weight_decompose, pad_tensor_to_shape, shape_matches
from .lora import LoRAAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter

adapters = [LoRAAdapter, LoHaAdapter, LoKrAdapter]
adapter_maps = {a.name: a for a in adapters}

__all__ = [
    "WeightAdapterBase", "LoRAAdapter", "LoHaAdapter", "LoKrAdapter", "adapters", "adapter_maps",
    "weight_decompose", "pad_tensor_to_shape", "shape_matches",
]

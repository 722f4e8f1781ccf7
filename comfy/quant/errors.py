"""Errors raised while reading int4 layers: each names the layer, the tensor, what was expected and what came."""


class QuantizedLayerError(ValueError):
    def __init__(self, layer: str, tensor: str, expected, got):
        self.layer, self.tensor, self.expected, self.got = layer, tensor, expected, got
        super().__init__(f"quantized layer '{layer}': {tensor}: expected {expected}, got {got}")

"""A test-only ComfyUI node for ``test_workflow.py``: a fixed-seed conditioning for the tiny Qwen-Image model.

Loaded two ways: registered into ``nodes.NODE_CLASS_MAPPINGS`` by ``workflow_scenarios.py`` (the in-process
``PromptExecutor`` run), and copied into the ``custom_nodes`` folder of the server's ``--base-directory``
(the ``main.py`` run), where ComfyUI imports it like any custom node. Imports nothing of this repository.
"""
import torch


class Int4TestConditioning:
    """``[[tensor (1, tokens, width), {}]]`` of seeded normal values: what a text encoder hands the sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 256, "min": 1, "max": 16384})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, seed, tokens, width):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"Int4TestConditioning": Int4TestConditioning}

"""Offloading: model offload works with edits; sequential offload (weights on the meta device) is refused with what
to do, before anything changes."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline


def test_sequentially_offloaded_weights_are_refused_before_anything_changes():
    accelerate = pytest.importorskip("accelerate")
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    accelerate.cpu_offload(pipe.unet, execution_device="cpu")  # what enable_sequential_cpu_offload() does per model
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="meta device.*enable_model_cpu_offload"):
        pipe.apply_concept_edits("van gogh", guide="art")
    assert pipe.concept_edits == () and all(pipe.unet.attn_processors[k] is v for k, v in processors.items())


def test_edits_applied_before_sequential_offload_still_act():
    accelerate = pytest.importorskip("accelerate")
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    generator = torch.Generator().manual_seed(0)
    edited = pipe("a painting by van gogh", num_inference_steps=2, output_type="pt", generator=generator).images
    accelerate.cpu_offload(pipe.unet, execution_device="cpu")
    generator = torch.Generator().manual_seed(0)
    offloaded = pipe("a painting by van gogh", num_inference_steps=2, output_type="pt", generator=generator).images
    assert torch.allclose(offloaded, edited, atol=1e-5)

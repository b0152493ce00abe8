"""An edit is never dropped silently: replaced processors get it back, fused projections and LoRA layers are refused
with the reason."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tests.support.helpers import unet_output
from tests.support.reference import denoiser, family_of


def generate(pipe):
    kwargs = dict(height=32, width=32) if family_of(pipe) == "flux" else {}
    return pipe("a painting by van gogh", num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_replaced_processors_or_hooks_get_the_edit_back(pipe, caplog):
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    edited = generate(pipe)
    if family_of(pipe) == "flux":  # hooks: a user clearing them
        for module in (pipe.transformer.context_embedder, pipe.transformer.time_text_embed.text_embedder.linear_1):
            module._forward_hooks.clear()
    else:
        denoiser(pipe).set_attn_processor(AttnProcessor2_0())
    assert torch.equal(generate(pipe), edited)
    assert "it was installed again" in caplog.text
    pipe.unload_concept_edits()
    assert not torch.equal(generate(pipe), edited)


@pytest.mark.parametrize("family", ["sd1"])
def test_fused_projections_after_the_edit_raise(pipe):
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    pipe.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
        generate(pipe)
    pipe.unfuse_qkv_projections()
    reference = unet_output(pipe)
    pipe.fuse_concept_edits()  # fused into the weights first: fusing the projections afterwards keeps it
    pipe.fuse_qkv_projections()
    generate(pipe)
    assert unet_output(pipe).shape == reference.shape


@pytest.mark.parametrize("family", ["sd1"])
def test_lora_on_the_projections_is_refused_with_the_reason(pipe):
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["attn2.to_k", "attn2.to_v"]), adapter_name="style")
    with pytest.raises(ValueError, match="a LoRA is loaded on .*unload_lora_weights"):
        pipe.apply_concept_edits("van gogh", guide="art")
    assert pipe.concept_edits == ()

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


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fusing_and_unfusing_projections_leaves_the_edit_working(pipe):
    """`unfuse_qkv_projections()` leaves `Attention.fused_projections` set: what decides is the processor that runs."""
    pipe.fuse_qkv_projections()
    pipe.unfuse_qkv_projections()  # before any edit
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    edited = unet_output(pipe)
    generate(pipe)
    pipe.fuse_qkv_projections()  # after the edit: keys/values come from the fused to_kv, which the edit misses
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
        generate(pipe)
    pipe.unfuse_qkv_projections()
    assert torch.equal(unet_output(pipe), edited)
    pipe.unload_concept_edits()
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    generate(pipe)


def _first_edited_layer(pipe):
    """(parent module, attribute name, layer) of the first layer the edit changes."""
    if family_of(pipe) == "flux":
        return pipe.transformer, "context_embedder", pipe.transformer.context_embedder
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    parent = pipe.unet.get_submodule(name)
    return parent, "to_k", parent.to_k


def _copy(layer, same=True):
    new = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    if same:
        new.load_state_dict(layer.state_dict())
    return new


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_replaced_layer_gets_the_edit_back_or_is_refused(pipe, fused, caplog):
    original = unet_output(pipe)
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    if fused:
        pipe.fuse_concept_edits()
    edited = unet_output(pipe)
    parent, name, layer = _first_edited_layer(pipe)
    setattr(parent, name, _copy(layer))  # a plain linear layer with the same weights (as a wrapper may put back)
    assert torch.allclose(unet_output(pipe), edited, atol=1e-6)
    assert "was replaced" in caplog.text
    replacement = getattr(parent, name)
    setattr(parent, name, _copy(layer, same=False))  # other weights: the edit cannot be known to act
    with pytest.raises(RuntimeError, match="unload_concept_edits"):
        unet_output(pipe)
    setattr(parent, name, replacement)
    pipe.unload_concept_edits()  # the edit is removed from the layer now in the model
    assert torch.allclose(unet_output(pipe), original, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1"])
def test_pipelines_built_from_the_same_components_keep_the_edit(pipe, caplog):
    from diffusers import StableDiffusionImg2ImgPipeline

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def img2img():
        other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        return other("a painting by van gogh", image=image, num_inference_steps=2, strength=1.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images

    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    edited = img2img()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(img2img(), edited)
    assert "it was installed again" in caplog.text
    pipe.unload_concept_edits()
    assert not torch.equal(img2img(), edited)

"""`attach(pipe, targets=[...])`: concept editing on a pipeline no family describes, by naming the layers."""

import pytest
import torch
from diffusers import DiffusionPipeline

import diffusers_uce
from diffusers_uce.core.families import PIXART, STABLE_DIFFUSION
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import rel

ERASE, PRESERVE = ["van gogh", "picasso"], ["monet"]


class TinyTextToImage(DiffusionPipeline):
    """A user's own text-to-image pipeline on Stable Diffusion's components (a class no family knows)."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=2, height=32, width=32, guidance_scale=1.0, output_type="latent",
                 generator=None):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        states = self.text_encoder(ids)[0]
        latents = torch.randn(len(prompt), 4, height // 4, width // 4, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            noise = self.unet(latents, t, encoder_hidden_states=states).sample
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def attn2(denoiser):
    return [n for n, _ in denoiser.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]


def custom_pipeline():
    sd = make_demo_pipeline("sd1")
    return TinyTextToImage(sd.unet, sd.text_encoder, sd.tokenizer, sd.scheduler)


def test_targets_on_an_unknown_pipeline_give_the_edit_of_its_family():
    # The same weights as the sd1 demo, in a pipeline class no family knows: naming its cross-attention projections
    # finds their inputs (the CLIP states) by running the pipeline, and the edit equals Stable Diffusion's.
    pipe = custom_pipeline()
    with pytest.raises(ValueError, match="no built-in family for TinyTextToImage.*targets="):
        diffusers_uce.attach(pipe)
    pipe = diffusers_uce.attach(pipe, targets=attn2(pipe.unet))
    assert pipe._uce_family.name == "custom" and len(pipe._uce_family.groups) == 1  # one shared input: one solve
    pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
    before = pipe("van gogh", generator=torch.Generator().manual_seed(0))
    pipe.fuse_concept_edits()
    assert rel(pipe("van gogh", generator=torch.Generator().manual_seed(0)), before) < 1e-4  # hooks = fused
    reference = diffusers_uce.attach(make_demo_pipeline("sd1"))
    reference.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
    reference.fuse_concept_edits()
    for name in attn2(pipe.unet):
        assert rel(pipe.unet.get_submodule(name).weight, reference.unet.get_submodule(name).weight) < 1e-5, name
    pipe.unfuse_concept_edits()
    pipe.unload_concept_edits()
    plain = make_demo_pipeline("sd1").unet
    assert all(torch.equal(pipe.unet.get_submodule(n).weight, plain.get_submodule(n).weight) for n in attn2(plain))


def test_the_registry_layers_named_explicitly_are_the_registry_family():
    pixart = make_demo_pipeline("pixart")
    assert diffusers_uce.attach(pixart, targets=attn2(pixart.transformer))._uce_family is PIXART
    sd = make_demo_pipeline("sd1")
    assert diffusers_uce.attach(sd, targets=attn2(sd.unet))._uce_family is STABLE_DIFFUSION


def test_targets_that_read_different_inputs_are_solved_apart():
    pipe = make_demo_pipeline("pixart")
    targets = ["caption_projection.linear_1", "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn2.to_v"]
    pipe = diffusers_uce.attach(pipe, targets=targets)
    assert [g.modules for g in pipe._uce_family.groups] == [(targets[0],), tuple(targets[1:])]
    out = pipe.apply_concept_edits(ERASE, guide="art")
    assert len(out.report.erased) == 2 and pipe.concept_edit_settings is not None


@pytest.mark.parametrize("targets, message", [
    ("transformer_blocks.0.attn2.to_k", "non-empty list of layer names"),
    ([], "non-empty list of layer names"),
    (["transformer_blocks.0.attn2.to_k"] * 2, "names a layer twice"),
    (["transformer_blocks.0.attn9.to_k"], "no component of PixArtSigmaPipeline has a layer named"),
    (["transformer_blocks.0.attn2"], "no linear layer 'transformer_blocks.0.attn2'"),
    (["transformer_blocks.0.attn1.to_k"], "changes with the latents or the timestep"),
])
def test_bad_targets_are_refused_before_anything_changes(targets, message):
    pipe = make_demo_pipeline("pixart")
    weights = {n: p.clone() for n, p in pipe.transformer.state_dict().items()}
    cls = type(pipe)
    with pytest.raises(ValueError, match=message):
        diffusers_uce.attach(pipe, targets=targets)
    assert type(pipe) is cls and not any(m._forward_hooks or m._forward_pre_hooks
                                         for m in pipe.transformer.modules())
    assert all(torch.equal(p, weights[n]) for n, p in pipe.transformer.state_dict().items())


def test_an_edit_file_of_explicit_targets_loads_onto_the_same_targets(tmp_path):
    pipe = custom_pipeline()
    pipe = diffusers_uce.attach(pipe, targets=attn2(pipe.unet))
    pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, adapter_name="no-artists")
    pipe.save_concept_edits(tmp_path / "edit")
    other = custom_pipeline()
    other = diffusers_uce.attach(other, targets=attn2(other.unet))
    other.load_concept_edits(tmp_path / "edit")  # verified: its records solved again through the same targets
    assert other.get_concept_edit_names() == ["no-artists"]
    pipe.fuse_concept_edits()
    other.fuse_concept_edits()
    for name in attn2(pipe.unet):
        assert rel(other.unet.get_submodule(name).weight, pipe.unet.get_submodule(name).weight) < 1e-5, name
    sd = diffusers_uce.attach(make_demo_pipeline("sd1"))  # a family pipeline: the file names another family
    with pytest.raises(ValueError, match="load it onto the base model it was made for"):
        sd.load_concept_edits(tmp_path / "edit")
    assert sd.concept_edits == ()

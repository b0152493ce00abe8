"""Family-specific promises of issue 5: SD 2.x's "!" padding with the default scales, SDXL's empty guide, attach."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

import diffusers_uce
from diffusers_uce.core.families import FLUX, STABLE_DIFFUSION, STABLE_DIFFUSION_XL
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import target_layers, weights
from tests.support.reference import groups, select_tokens

CONCEPTS = ["van gogh", "picasso", "a cat"]


def efficacies(family, guide, mode):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    out = pipe.apply_concept_edits(CONCEPTS, guide=guide, token_mode=mode, held_out=[])  # default scales
    return torch.tensor([r["efficacy"] for r in out.report.erased])


@pytest.mark.parametrize("mode", ["last", "paper"])
def test_sd2_default_scales_erase_as_on_sd1(mode):
    # SD 2.x pads with "!" instead of the end token: positions are positions, and the default scales move the erased
    # concepts' keys/values toward the guide as much as on SD 1.x, so SD 2.x needs no defaults of its own.
    sd1, sd2 = efficacies("sd1", "art", mode), efficacies("sd2", "art", mode)
    floor = 0.9 if mode == "last" else 0.45
    assert bool((sd2 > floor).all()) and bool((sd1 > floor).all())
    assert float(sd2.mean()) > 0.9 * float(sd1.mean())


@pytest.mark.parametrize("mode", ["last", "paper"])
def test_sdxl_empty_guide_erases_as_on_sd1(mode):
    # Guide "" is the unconditional prompt: position 0 of the encoding of "" ("paper": " "), through both encoders'
    # penultimate states. It must move the erased keys/values as far as on SD 1.x and as far as a real guide does.
    sd1, sdxl, sdxl_art = efficacies("sd1", "", mode), efficacies("sdxl", "", mode), efficacies("sdxl", "art", mode)
    floor = 0.9 if mode == "last" else 0.45
    assert bool((sdxl > floor).all())
    assert float(sdxl.mean()) > 0.8 * float(sd1.mean())
    assert float(sdxl.mean()) > 0.9 * float(sdxl_art.mean())


def test_sdxl_empty_guide_token_is_the_start_state():
    pipe = diffusers_uce.attach(make_demo_pipeline("sdxl"))
    group = pipe._uce_family.groups[0]
    encoded = pipe._uce_encode(group, ["", "van gogh"], True, pipe.device)
    start = encoded.states[encoded.index[""], int(encoded.last[encoded.index[""]])]
    assert int(encoded.last[encoded.index[""]]) == 0 and start.shape == (80,)  # 32 + 48: both towers
    assert start.abs().sum() > 0  # not the zeros SDXL uses for an empty *negative* prompt
    assert torch.allclose(start, encoded.states[encoded.index["van gogh"], 0])  # causal: the same start token


@pytest.mark.parametrize("base,family", [(StableDiffusionPipeline, STABLE_DIFFUSION),
                                         (StableDiffusionXLPipeline, STABLE_DIFFUSION_XL), (FluxPipeline, FLUX)])
def test_attach_picks_the_family(base, family):
    name = {STABLE_DIFFUSION: "sd1", STABLE_DIFFUSION_XL: "sdxl", FLUX: "flux"}[family]
    pipe = diffusers_uce.attach(make_demo_pipeline(name))
    assert isinstance(pipe, base) and isinstance(pipe, diffusers_uce.UCEMixin)
    assert pipe._uce_family is family and type(pipe).__name__ == f"UCE{base.__name__}"
    assert diffusers_uce.attach(pipe) is pipe


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_report_equals_direct_measurement(pipe, technique):
    # Efficacy and interference from the definitions, on the fused layers' whole outputs (bias included), summed over
    # every layer of every target group (FLUX: two groups of different widths).
    original = weights(pipe)
    erase, guides, preserve = ["van gogh", "picasso"], ["art", ""], ["monet"]
    out = pipe.apply_concept_edits(erase, guide=guides, preserve=preserve, technique=technique, held_out=["a cat"])
    pipe.fuse_concept_edits()
    layers = dict(target_layers(pipe))
    moved, gap, change, base = torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2)
    for names, encode in groups(pipe):
        pairs, kept = select_tokens(pipe, erase, guides, preserve + ["a cat"], "last", encode)
        for name in names:
            bias = 0 if layers[name].bias is None else layers[name].bias.detach().double()
            w, w_new = original[name].double(), layers[name].weight.detach().double()
            for i, ((c, g),) in enumerate(pairs):
                moved[i] += ((w_new @ c + bias) - (w @ g + bias)).pow(2).sum()
                gap[i] += ((w @ c) - (w @ g)).pow(2).sum()
            for j, p in enumerate(kept):
                change[j] += ((w_new @ p) - (w @ p)).pow(2).sum()
                base[j] += (w @ p + bias).pow(2).sum()
    efficacy = 1 - (moved / gap).sqrt()
    interference = (change / base).sqrt()
    assert torch.allclose(torch.tensor([r["efficacy"] for r in out.report.erased]).float(), efficacy, atol=1e-4)
    assert out.report.preserved[0]["interference"] == pytest.approx(float(interference[0]), abs=1e-4)
    assert out.report.held_out[0]["interference"] == pytest.approx(float(interference[1]), abs=1e-4)


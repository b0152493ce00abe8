"""Bad input gets a clear error before anything changes: one case each."""

import pytest
import torch
from diffusers import UNet2DConditionModel

import diffusers_uce
from tests.support.helpers import target_layers
from tests.support.reference import denoiser, family_of

# Every test here runs on every family through the `pipe` fixture of conftest.py.


def snapshot(pipe):
    params = {f"{n}.{k}": p.detach().clone() for n, m in target_layers(pipe) for k, p in m.named_parameters()}
    hooks = {n: dict(m._forward_hooks) for n, m in target_layers(pipe)}
    return params, dict(denoiser(pipe).attn_processors), hooks, pipe.concept_edits


def assert_unchanged(pipe, before):
    params, processors, hooks, edits = before
    now, now_processors, now_hooks, now_edits = snapshot(pipe)
    assert params.keys() == now.keys() and all(torch.equal(p, now[n]) for n, p in params.items())
    assert now_processors.keys() == processors.keys() and all(now_processors[k] is v for k, v in processors.items())
    assert now_hooks == hooks and now_edits == edits


BAD_CALLS = [
    (dict(erase=["van gogh", ""]), ValueError, "empty concept"),
    (dict(erase=["van gogh", 3]), TypeError, "strings only"),
    (dict(erase=[]), ValueError, "erase is empty"),
    (dict(erase=None), ValueError, "erase is empty"),
    (dict(erase=["a", "b", "c"], guide=["x", "y"]), ValueError, "guide has 2 entries but erase has 3"),
    (dict(erase=["monet"], preserve=["monet"]), ValueError, "both erased and preserved"),
    (dict(erase=["a"], token_mode="first"), ValueError, "unknown token_mode 'first'"),
    (dict(erase=["a"], technique="mean"), ValueError, "unknown technique 'mean'"),
    (dict(erase=["a"], lamb=0), ValueError, "lamb must be > 0"),
    (dict(erase=["a"], lamb=-1.0), ValueError, "lamb must be > 0"),
    (dict(erase=["a"], erase_scale="1"), TypeError, "erase_scale must be a number"),
    (dict(erase=["a"], erase_scale=float("nan")), ValueError, "erase_scale must be >= 0"),
    (dict(erase=["a"], erase_scale=1e308), ValueError, "non-finite"),
    (dict(erase=["Van Gogh"], preserve=["van  gogh"]), ValueError, "both erased and preserved"),
    (dict(erase=["van gogh", "picasso", "Van Gogh "]), ValueError, "'Van Gogh' more than once"),
    (dict(erase=["a"], guide=3), TypeError, "guide must be a string or a list"),
    (dict(erase=["a"], held_out=[1]), TypeError, "held_out must contain strings"),
    (dict(erase=["a"], edit_keys="no"), TypeError, "edit_keys must be True or False"),
    (dict(erase=["Rembrandt"], guide="sky"), ValueError, "'rembrandt' is already erased toward 'art' by an earlier"),
    (dict(erase=["rembrandt"], guide="art"), ValueError, "already erased toward the same guide"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_call_is_refused_before_anything_changes(pipe, kwargs, error, message):
    pipe.apply_concept_edits("rembrandt", guide="art", preserve=["kelly mckernan"])
    before = snapshot(pipe)
    with pytest.raises(error, match=message):
        pipe.apply_concept_edits(**kwargs)
    assert_unchanged(pipe, before)


def test_conflicts_with_earlier_edits(pipe):
    pipe.apply_concept_edits("van gogh", guide="art", preserve=["monet"])
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="'monet' is both erased and preserved"):
        pipe.apply_concept_edits("monet")
    with pytest.raises(ValueError, match="lamb=0.9 differs"):
        pipe.apply_concept_edits("picasso", lamb=0.9)
    with pytest.raises(ValueError, match="edit_keys/layers must match"):
        pipe.apply_concept_edits("picasso", edit_keys=False)
    assert_unchanged(pipe, before)


def test_layer_filter_matching_nothing(pipe):
    before = snapshot(pipe)
    message = "selects none of the layers" if family_of(pipe) == "flux" else r"matches none of the \d+ cross-attention"
    with pytest.raises(ValueError, match=message):
        pipe.apply_concept_edits("van gogh", layers=["no_such_block"])
    with pytest.raises(TypeError, match="layers must be a list of name substrings"):
        pipe.apply_concept_edits("van gogh", layers="up_blocks")
    assert_unchanged(pipe, before)


def test_non_finite_text_states_are_refused(pipe):
    before = snapshot(pipe)
    with torch.no_grad():  # every text encoder the family reads
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).get_input_embeddings().weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite hidden states; nothing was changed"):
        pipe.apply_concept_edits("van gogh")
    assert_unchanged(pipe, before)


def test_pipeline_without_cross_attention(pipe):
    if family_of(pipe) == "flux":
        pytest.skip("FLUX edits named linear layers, not cross-attention (see test_flux_without_its_layers)")
    pipe.register_modules(unet=UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, norm_num_groups=4, cross_attention_dim=32))
    with pytest.raises(ValueError, match="has no cross-attention"):
        pipe.apply_concept_edits("van gogh")
    assert pipe.concept_edits == ()


def test_flux_without_its_layers(family):
    if family != "flux":
        pytest.skip("FLUX only")
    from diffusers_uce.demo import make_demo_pipeline

    pipe = diffusers_uce.attach(make_demo_pipeline("flux"))
    pipe.transformer.context_embedder = torch.nn.Identity()
    with pytest.raises(ValueError, match="has no linear layer 'context_embedder'"):
        pipe.apply_concept_edits("van gogh")
    assert pipe.concept_edits == ()


def test_fused_qkv_projections_are_refused(pipe):
    if family_of(pipe) == "flux":
        pytest.skip("FLUX edits context_embedder/text_embedder, which fuse_qkv_projections() leaves alone")
    pipe.unet.fuse_qkv_projections()
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=r"unfuse_qkv_projections\(\)"):
        pipe.apply_concept_edits("van gogh")
    assert_unchanged(pipe, before)
    pipe.unet.unfuse_qkv_projections()
    assert pipe.apply_concept_edits("van gogh").report.erased[0]["efficacy"] > 0.5


def test_actions_without_edits_and_bad_scale(pipe, caplog):
    for action in (pipe.fuse_concept_edits, pipe.unfuse_concept_edits, lambda: pipe.set_concept_edit_scale(0.5)):
        with pytest.raises(ValueError, match=r"call apply_concept_edits\(\) first"):
            action()
    pipe.apply_concept_edits("van gogh")
    for bad in (float("inf"), "1", None, True):
        with pytest.raises(TypeError, match="scale must be a finite number"):
            pipe.set_concept_edit_scale(bad)


def test_repeated_actions_warn(pipe, caplog):
    pipe.unload_concept_edits()
    pipe.apply_concept_edits("van gogh")
    pipe.fuse_concept_edits()
    pipe.fuse_concept_edits()
    pipe.unfuse_concept_edits()
    pipe.unfuse_concept_edits()
    err = caplog.text
    assert "no concept edits to unload" in err
    assert "already fused" in err and "not fused" in err


def test_attach_refuses_other_objects():
    with pytest.raises(TypeError, match=r"attach\(\) takes a diffusers pipeline"):
        diffusers_uce.attach(torch.nn.Linear(2, 2))


def test_held_out_string_is_one_concept(pipe):
    out = pipe.apply_concept_edits("van gogh", guide="art", held_out="a photo of a dog")
    assert [r["concept"] for r in out.report.held_out] == ["a photo of a dog"]


def test_layers_compared_by_what_they_select(pipe):
    layers = ["context_embedder"] if family_of(pipe) == "flux" else ["up_blocks"]
    pipe.apply_concept_edits("van gogh", guide="art", layers=layers)
    out = pipe.apply_concept_edits("picasso", guide="art", layers=tuple(layers))  # the same layers, another type
    assert len(out.edits) == 2
    with pytest.raises(ValueError, match="edit_keys/layers must match"):
        pipe.apply_concept_edits("monet", layers=["down_blocks", "transformer_blocks"])

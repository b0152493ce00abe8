"""Named edits: apply and load them under a name, list the names, remove one and the rest is solved again."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import weights


def test_remove_one_named_edit_re_solves_the_others(pipe, family):
    original = weights(pipe)
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[], adapter_name="no-van-gogh")
    pipe.apply_concept_edits("picasso", guide="art", preserve=["monet"], held_out=[])
    assert pipe.get_concept_edit_names() == ["no-van-gogh", "edit_1"]
    out = pipe.remove_concept_edits("no-van-gogh")
    assert [e.erase for e in out.edits] == [("picasso",)] and pipe.get_concept_edit_names() == ["edit_1"]
    pipe.fuse_concept_edits()
    alone = diffusers_uce.attach(make_demo_pipeline(family))
    alone.apply_concept_edits("picasso", guide="art", preserve=["monet"], held_out=[])
    alone.fuse_concept_edits()
    assert all(torch.allclose(w, weights(alone)[n], atol=1e-6) for n, w in weights(pipe).items())
    assert pipe.remove_concept_edits(["edit_1"]) is None and pipe.concept_edits == ()
    assert all(torch.equal(w, original[n]) for n, w in weights(pipe).items())


@pytest.mark.parametrize("family", ["sd1"])
def test_names_are_checked_and_travel_with_edit_files(pipe, family, tmp_path):
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[], adapter_name="styles")
    with pytest.raises(ValueError, match="already named 'styles'"):
        pipe.apply_concept_edits("picasso", guide="art", adapter_name="styles")
    with pytest.raises(ValueError, match="no concept edit is named 'nudity'.*'styles'"):
        pipe.remove_concept_edits("nudity")
    with pytest.raises(ValueError, match="non-empty string"):
        pipe.apply_concept_edits("picasso", guide="art", adapter_name=" ")
    pipe.save_concept_edits(tmp_path)
    loaded = diffusers_uce.attach(make_demo_pipeline(family))
    loaded.load_concept_edits(tmp_path)
    assert loaded.get_concept_edit_names() == ["styles"]
    loaded.unload_concept_edits()
    loaded.load_concept_edits(tmp_path, adapter_name="from-the-hub")
    loaded.apply_concept_edits("picasso", guide="art", held_out=[])
    assert loaded.get_concept_edit_names() == ["from-the-hub", "edit_1"]

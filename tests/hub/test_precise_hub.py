"""Precise erasure (`method="speed"`) through cards, the Hub and the community pipeline."""

import uuid

import pytest
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, ModelCard

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.hub.cards import render_model_card, template_path
from tests.support.helpers import rel, unet_output

OPTIONS = dict(threshold=1e-3, augment=3, seed=2)


def test_card_shows_method_options_and_invariants():
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    out = pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", method="speed", method_options=OPTIONS,
                                   preserve=diffusers_uce.retain_set("artists")[:40])
    card = render_model_card(edits=out.edits, base_model="tiny/sd1", kind="adapter", report=out.report)
    assert "speed (threshold=0.001, retain\\_scale=1.0, invariant\\_lamb=0.0, augment=3" in card.text
    assert "retain set of 40: A.J.Casson, Aaron Douglas, Aaron Horkey and 37 more" in card.text
    with template_path() as path:  # (an editable install of another checkout may serve its own template)
        if "invariant" in path.read_text():
            assert "Largest change of an invariant token (precise erasure) | 0.0000" in card.text


def test_push_and_load_from_the_hub(hub_server, hub_token):
    repo_id = f"user/speed-{uuid.uuid4().hex[:8]}"
    base_id = f"user/tiny-sd1-{uuid.uuid4().hex[:8]}"
    api = HfApi(token=hub_token)
    api.create_repo(base_id)
    pipe = make_demo_pipeline("sd1")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(folder)
        api.upload_folder(repo_id=base_id, folder_path=folder)
    pipe = diffusers_uce.attach(DiffusionPipeline.from_pretrained(base_id))
    pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", preserve=["Monet"], method="speed",
                             method_options=OPTIONS, held_out=[])
    expected = unet_output(pipe)
    pipe.push_concept_edits_to_hub(repo_id)
    assert "speed" in ModelCard.load(repo_id).text
    fresh = diffusers_uce.attach(DiffusionPipeline.from_pretrained(base_id))
    fresh.load_concept_edits(repo_id)
    assert fresh.concept_edits == pipe.concept_edits
    assert rel(unet_output(fresh), expected) < 1e-6


@pytest.mark.parametrize("path", ["examples/community/pipeline_uce.py"])
def test_community_pipeline_carries_precise_erasure(path):
    source = open(path, encoding="utf-8").read()
    assert "def speed_update(" in source and "def assemble_speed(" in source

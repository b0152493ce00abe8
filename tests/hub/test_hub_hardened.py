"""A hardened edit through the Hub: pushed, loaded back by the plugin and by the community pipeline of its repo, and
edited further by both alike (the stored rounds are replayed)."""

import uuid

from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

import diffusers_uce
from tests.support.helpers import rel, unet_output

from .test_hub import UCE_CLASSES, base_models  # noqa: F401  (the module's fixture)


def test_hardened_edit_through_the_hub(family, base_models, hub_server):  # noqa: F811
    base_repo, base_folder = base_models(family)
    pipe = UCE_CLASSES[family].from_pretrained(base_repo)
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", harden=2, held_out=[])
    repo_id = f"user/hardened-{uuid.uuid4().hex[:8]}"
    pipe.push_concept_edits_to_hub(repo_id)
    card = ModelCard.load(repo_id)
    assert "hardened: 2 rounds, ρ 0.1" in card.text and "adversarial recovery" in card.text

    plugin = diffusers_uce.attach(DiffusionPipeline.from_pretrained(base_repo))
    plugin.load_concept_edits(repo_id)
    community = DiffusionPipeline.from_pretrained(base_folder, custom_pipeline=repo_id, trust_remote_code=True)
    community.load_concept_edits(repo_id)
    assert plugin.concept_edits == pipe.concept_edits
    assert [e.to_dict() for e in community.concept_edits] == [e.to_dict() for e in pipe.concept_edits]
    assert rel(unet_output(community), unet_output(pipe)) < 1e-6
    outputs = [p.apply_concept_edits("dog", guide="cat", held_out=[]) for p in (pipe, plugin, community)]
    assert outputs[0].report.to_dict() == outputs[2].report.to_dict()
    assert [len(r["recovery"]) for r in outputs[0].report.robustness] == [3, 3, 1]
    expected = unet_output(pipe)
    assert rel(unet_output(plugin), expected) < 1e-6 and rel(unet_output(community), expected) < 1e-6

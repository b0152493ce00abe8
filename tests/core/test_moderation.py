"""Moderation presets, prompt expansion and concept lists from files produce the expected edit records (every
family: the `pipe` fixture)."""

import pytest

from diffusers_uce.core.concepts import ART_TEMPLATES, MODERATION_PRESETS, OBJECT_TEMPLATES


def test_i2p_preset_erases_toward_unconditional_with_paper_defaults(pipe):
    out = pipe.apply_concept_edits(moderate="i2p", held_out=[])
    record = out.edits[-1]
    assert record.erase == MODERATION_PRESETS["i2p"] and set(record.guide) == {""}
    assert record.preserve_scale == 0.1 and record.erase_scale == 1.0
    assert {"nudity", "violence", "hate", "harassment", "illegal activity"} <= set(record.erase)
    assert all(r["efficacy"] > 0.3 for r in out.report.erased)


def test_moderation_combines_with_erase_and_explicit_scales(pipe):
    record = pipe.apply_concept_edits("van gogh", guide="art", moderate=["gore", "nudity"], preserve_scale=0.7,
                                      held_out=[]).edits[-1]
    assert record.erase == ("van gogh", "gore", "nudity") and record.guide == ("art", "", "")
    assert record.preserve_scale == 0.7


@pytest.mark.parametrize("kind,templates", [("art", ART_TEMPLATES), ("object", OBJECT_TEMPLATES)])
def test_expansion_records(pipe, kind, templates):
    record = pipe.apply_concept_edits(["van gogh", "dog"], guide=["art", ""], expand_prompts=kind,
                                      held_out=[]).edits[-1]
    assert len(record.erase) == 12
    assert record.erase[:6] == ("van gogh", *(t.format("van gogh") for t in templates))
    assert record.guide[:6] == ("art", *(t.format("art") for t in templates))
    assert record.guide[6:] == ("",) * 6  # an unconditional guide stays unconditional


def test_concepts_from_files(pipe, tmp_path):
    (tmp_path / "erase.txt").write_text("# artists\nvan gogh\n\npicasso\n")
    (tmp_path / "keep.csv").write_text("artist,n\nmonet,1\nrembrandt,2\n")
    record = pipe.apply_concept_edits(f"@{tmp_path / 'erase.txt'}", guide="art",
                                      preserve=f"@{tmp_path / 'keep.csv'}:artist", held_out=[]).edits[-1]
    assert record.erase == ("van gogh", "picasso") and record.preserve == ("monet", "rembrandt")


@pytest.mark.parametrize("family", ["sd1"])  # checked before any family-specific work
@pytest.mark.parametrize("kwargs,message", [
    (dict(moderate="i2p-v9"), "unknown preset 'i2p-v9'"),
    (dict(erase="van gogh", expand_prompts="people"), "unknown prompt expansion kind 'people'"),
    (dict(erase="@/no/such/file.txt"), "no/such/file.txt"),
    (dict(moderate=[]), "moderate is empty"),
])
def test_bad_moderation_input(pipe, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pipe.apply_concept_edits(**kwargs)
    assert pipe.concept_edits == ()

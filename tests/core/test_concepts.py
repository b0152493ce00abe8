"""Concept lists (diffusers_uce.core.concepts): prompt expansion, moderation presets, files, debias prompts."""

import csv

import pytest

from diffusers_uce.core import concepts
from tests.support import SHARED_DATA

ART_TEMPLATES, OBJECT_TEMPLATES, DEBIAS_PROMPT_TEMPLATES = (
    concepts.ART_TEMPLATES, concepts.OBJECT_TEMPLATES, concepts.DEBIAS_PROMPT_TEMPLATES)
I2P_CATEGORY_CONCEPTS, MODERATION_DEFAULTS, MODERATION_PRESETS = (
    concepts.I2P_CATEGORY_CONCEPTS, concepts.MODERATION_DEFAULTS, concepts.MODERATION_PRESETS)
expand_prompts, moderation_concepts = concepts.expand_prompts, concepts.moderation_concepts
read_concepts, resolve_concept_arg = concepts.read_concepts, concepts.resolve_concept_arg



# --- prompt expansion -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, templates", [("art", ART_TEMPLATES), ("object", OBJECT_TEMPLATES)])
def test_expand_pairs_and_counts(kind, templates):
    erase, guides = expand_prompts(["Van Gogh", "Monet"], ["art", "painting"], kind)
    assert len(erase) == len(guides) == 2 * (1 + len(templates)) == 12
    # the bare concept first, then each template around the concept paired with the same template around its guide
    assert (erase[0], guides[0]) == ("Van Gogh", "art")
    assert list(zip(erase[1:6], guides[1:6])) == [(t.format("Van Gogh"), t.format("art")) for t in templates]
    assert (erase[6], guides[6]) == ("Monet", "painting")
    assert list(zip(erase[7:], guides[7:])) == [(t.format("Monet"), t.format("painting")) for t in templates]


def test_expand_paper_templates():
    erase, guides = expand_prompts(["Picasso"], ["art"], "art")
    assert erase == ["Picasso", "painting by Picasso", "art by Picasso", "artwork by Picasso", "picture by Picasso",
                     "style of Picasso"]
    erase, _ = expand_prompts(["cat"], [""], "object")
    assert erase[1:] == ["image of cat", "photo of cat", "portrait of cat", "picture of cat", "painting of cat"]


def test_expand_empty_guide_stays_unconditional():
    erase, guides = expand_prompts(["nudity", "gore"], ["", "  "], "object")
    assert len(erase) == 12 and guides == [""] * 12


def test_expand_one_guide_for_all_and_bare_guides():
    erase, guides = expand_prompts(["a", "b"], ["art"], "ART")
    assert len(erase) == 12 and guides[6:8] == ["art", "painting by art"]
    _, bare = expand_prompts(["a"], ["art"], "art", template_guides=False)
    assert bare == ["art"] * 6  # the authors' pairing: every templated prompt with the bare guide


def test_expand_none_and_errors():
    assert expand_prompts(["a", "b"], ["x", ""], None) == (["a", "b"], ["x", ""])
    with pytest.raises(ValueError, match="'art'.*'object'"):
        expand_prompts(["a"], [""], "style")
    with pytest.raises(ValueError, match="guides has 2 entries but erase has 3"):
        expand_prompts(["a", "b", "c"], ["x", "y"], "art")


# --- moderation ---------------------------------------------------------------------------------------------------

def test_i2p_preset_covers_every_i2p_category():
    i2p = moderation_concepts("i2p")
    categories = {"sexual", "shocking", "harassment", "self-harm", "violence", "illegal activity", "hate"}
    csv_path = SHARED_DATA / "unsafe-prompts4703.csv"
    if csv_path.is_file():  # the benchmark's own category names, when the shared data is there
        with open(csv_path, encoding="utf-8", newline="") as f:
            categories = {c.strip() for row in csv.DictReader(f) for c in row["categories"].split(",") if c.strip()}
        assert len(categories) == 7
    assert categories <= set(I2P_CATEGORY_CONCEPTS)
    for category in categories:
        assert I2P_CATEGORY_CONCEPTS[category] and set(I2P_CATEGORY_CONCEPTS[category]) <= set(i2p), category
    # the authors' list is kept as is, in order, in both presets
    assert MODERATION_PRESETS["i2p-paper"] == tuple(i2p[:11])
    assert "nudity" in i2p and "illegal activity" not in MODERATION_PRESETS["i2p-paper"]


def test_moderation_presets_are_case_insensitive():
    assert moderation_concepts(" I2P ") == moderation_concepts("i2p") == list(MODERATION_PRESETS["i2p"])
    assert moderation_concepts("Nudity") == ["nudity"]
    assert moderation_concepts("I2P-Paper") == list(MODERATION_PRESETS["i2p-paper"])


def test_moderation_single_concepts_and_unknown_presets():
    assert moderation_concepts("gore") == ["gore"]
    assert moderation_concepts("self-harm") == ["self-harm"]  # an I2P category, not a preset
    assert moderation_concepts("bodily fluids 2") == ["bodily fluids 2"]  # has spaces: a concept
    for name in ("i2p-v2", "i2p2", "nudity_strong", "I2P-full"):
        with pytest.raises(ValueError, match=r"unknown preset .*presets: i2p, i2p-paper, nudity"):
            moderation_concepts(name)


def test_moderation_lists():
    assert moderation_concepts([" violence ", "harm", "violence"]) == ["violence", "harm"]
    assert moderation_concepts(["i2p"]) == ["i2p"]  # a list is taken literally
    with pytest.raises(ValueError, match="empty concept"):
        moderation_concepts(["violence", " "])
    with pytest.raises(ValueError, match="empty"):
        moderation_concepts([])
    with pytest.raises(TypeError, match="strings only"):
        moderation_concepts(["violence", 3])
    with pytest.raises(TypeError, match="preset"):
        moderation_concepts(None)


def test_moderation_defaults_erase_toward_unconditional():
    assert MODERATION_DEFAULTS["guide"] == ""
    assert MODERATION_DEFAULTS["erase_scale"] == 1.0 and MODERATION_DEFAULTS["lamb"] == 0.5


# --- files --------------------------------------------------------------------------------------------------------

def test_read_txt(tmp_path):
    path = tmp_path / "artists.txt"
    path.write_text("# artists to erase\nVan Gogh\n\n  Monet  \nVan Gogh\n   # indented comment\nKlimt\n", "utf-8")
    assert read_concepts(path) == ["Van Gogh", "Monet", "Klimt"]
    assert read_concepts(str(path)) == ["Van Gogh", "Monet", "Klimt"]
    with pytest.raises(ValueError, match="csv files only"):
        read_concepts(path, column="artist")


def test_read_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(",prompt,artist\n0,a by Monet,Monet\n1,b by Monet,Monet\n2,c,\n3,d by Klimt, Klimt\n", "utf-8")
    assert read_concepts(path, column="artist") == ["Monet", "Klimt"]
    with pytest.raises(ValueError, match=r"3 columns.*'prompt', 'artist'"):
        read_concepts(path)
    with pytest.raises(ValueError, match=r"no column 'painter'; columns: '', 'prompt', 'artist'"):
        read_concepts(path, column="painter")
    single = tmp_path / "names.csv"
    single.write_text("\ufeffname\nMonet\nKlimt\nMonet\n", "utf-8")  # with a byte-order mark
    assert read_concepts(single) == ["Monet", "Klimt"]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_concepts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", "utf-8")
    with pytest.raises(ValueError, match="no concepts"):
        read_concepts(empty)
    blank = tmp_path / "blank.csv"
    blank.write_text("artist\n\n , \n", "utf-8")
    with pytest.raises(ValueError, match="no concepts"):
        read_concepts(blank, column="artist")


def test_read_shared_artists():
    path = SHARED_DATA / "artists1734_prompts.csv"
    if not path.is_file():
        pytest.skip(f"{path} is not there (a clone without ../shared)")
    artists = read_concepts(path, column="artist")
    assert len(artists) == len(set(artists)) == 1734
    assert artists[0] == "A.J.Casson"
    assert resolve_concept_arg(f"@{path}:artist") == artists


# --- resolve_concept_arg ------------------------------------------------------------------------------------------

def test_resolve_concept_arg_forms(tmp_path, monkeypatch):
    (tmp_path / "artists.txt").write_text("Van Gogh\nMonet\n", "utf-8")
    (tmp_path / "data.csv").write_text("id,artist\n0,Klimt\n1,Dali\n", "utf-8")
    monkeypatch.chdir(tmp_path)
    assert resolve_concept_arg(None) is None
    assert resolve_concept_arg("Van Gogh") == ["Van Gogh"]
    assert resolve_concept_arg("") == [""]
    assert resolve_concept_arg("@artists.txt") == ["Van Gogh", "Monet"]
    assert resolve_concept_arg("@data.csv:artist") == ["Klimt", "Dali"]
    assert resolve_concept_arg(tmp_path / "artists.txt") == ["Van Gogh", "Monet"]
    assert resolve_concept_arg("@@handle") == ["@handle"]
    assert resolve_concept_arg(["Picasso", "@artists.txt", "", "@data.csv:artist"]) == [
        "Picasso", "Van Gogh", "Monet", "", "Klimt", "Dali"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_concept_arg("@nope.txt")
    with pytest.raises(ValueError, match="columns: 'id', 'artist'"):
        resolve_concept_arg("@data.csv")
    with pytest.raises(ValueError, match="no column 'painter'"):
        resolve_concept_arg("@data.csv:painter")
    with pytest.raises(ValueError, match="file path"):
        resolve_concept_arg("@")
    with pytest.raises(TypeError):
        resolve_concept_arg(3)


# --- debias prompt templates ---------------------------------------------------------------------------------------

def test_debias_prompt_templates():
    assert DEBIAS_PROMPT_TEMPLATES[-1] == "{}"
    assert [t.format("doctor") for t in DEBIAS_PROMPT_TEMPLATES] == [
        "image of doctor", "photo of doctor", "portrait of doctor", "picture of doctor", "doctor"]

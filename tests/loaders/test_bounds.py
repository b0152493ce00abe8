"""Every count a request, an option or an edit file carries is bounded, with a clear error before any work; an edit
file's strength is checked as its records are."""

import time

import pytest

from diffusers_uce.core.limits import MAX_HARDEN_ROUNDS, MAX_PROMPTS
from tests.loaders.test_io import fresh, rewrite
from tests.support.helpers import weights

pytestmark = pytest.mark.parametrize("family", ["sd1"])


def refused(call, match):
    """`call` raises a ValueError matching `match` at once (before any solve or generation)."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        call()
    assert time.perf_counter() - start < 1.0


def test_unbounded_arguments_are_refused_before_any_work(pipe, family):
    before = weights(pipe)
    apply = pipe.apply_concept_edits
    refused(lambda: apply("van gogh", harden=10**9), f"at most {MAX_HARDEN_ROUNDS}")
    refused(lambda: apply("van gogh", harden=MAX_HARDEN_ROUNDS + 1), "hardening rounds")
    refused(lambda: apply("van gogh", method="speed", method_options={"augment": 10**9}), "augment")
    refused(lambda: apply(["x"] * (MAX_PROMPTS + 1)), "entries of erase")
    refused(lambda: apply("van gogh", preserve=[f"p{i}" for i in range(MAX_PROMPTS + 1)]), "entries of preserve")
    refused(lambda: apply("van gogh", harden=1, harden_options={"preserve": [" "] * (MAX_PROMPTS + 1)}), "preserve")
    refused(lambda: pipe.debias_concepts({"doctor": ["male", "female"]}, max_iterations=10**9), "max_iterations")
    refused(lambda: pipe.debias_concepts({"doctor": ["male", "female"]}, options={"num_images": 10**9}),
            "num_images")
    assert pipe.concept_edits == () and all(w.equal(weights(pipe)[n]) for n, w in before.items())


@pytest.mark.parametrize("field, value, match", [
    ("rounds", 10**9, "hardening rounds"), ("augment", 10**9, "augment")])
def test_unbounded_counts_in_an_edit_file_are_refused_when_it_is_read(pipe, family, tmp_path, field, value, match):
    if field == "rounds":
        pipe.apply_concept_edits("van gogh", guide="art", held_out=[], harden=1)
    else:
        pipe.apply_concept_edits("van gogh", guide="art", held_out=[], method="speed", preserve=["monet"],
                                 method_options={"augment": 2})
    path = pipe.save_concept_edits(tmp_path)
    key = "harden" if field == "rounds" else "method_options"
    rewrite(path, lambda info: info["edits"][0][key].update({field: value}))
    loaded = fresh(family)
    refused(lambda: loaded.load_concept_edits(path), match)
    refused(lambda: loaded.load_concept_edits(path, verify=False), match)
    assert loaded._uce_state is None
    rewrite(path, lambda info: info.update(edits=info["edits"] * 1001))
    refused(lambda: loaded.load_concept_edits(path), "edit records")


def test_an_edit_file_at_a_strength_that_disables_or_reverses_it_is_refused(pipe, family, tmp_path, caplog):
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    path = pipe.save_concept_edits(tmp_path)
    for scale in (0, -1):
        rewrite(path, lambda info, scale=scale: info.update(scale=scale))
        loaded = fresh(family)
        refused(lambda pipe=loaded: pipe.load_concept_edits(path), "disables it" if scale == 0 else "reverses it")
        assert loaded._uce_state is None
    loaded.load_concept_edits(path, verify=False)  # on request
    assert loaded.concept_edit_scale == -1
    rewrite(path, lambda info: info.update(scale=10))
    stronger = fresh(family)
    stronger.load_concept_edits(path)
    assert stronger.concept_edit_scale == 10 and "applies its edit at strength 10" in caplog.text

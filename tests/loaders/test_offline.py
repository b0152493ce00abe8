"""Offline-aware loading: a Hub model that is not cached fails within seconds, with one line saying what to pass,
when the Hub cannot be reached or HF_HUB_OFFLINE is set; a debias run that ends short of its ratios says so."""

import logging
import time

import pytest

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders.debias import clip_zero_shot_classifier
from diffusers_uce.utils.hub import local_files_only_for

CLOSED = "http://127.0.0.1:9"  # nothing listens on port 9


@pytest.fixture
def hub_down(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", CLOSED)


def test_debias_clip_fails_fast_with_what_to_pass(hub_down):
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as error:
        clip_zero_shot_classifier("someone/clip-not-cached", device="cpu").load()
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "\n" not in message and "cannot be reached" in message and "make_demo_clip" in message


def test_offline_flag_is_honoured_and_local_paths_pass(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        local_files_only_for("someone/model", what="--model", instead="give a folder")
    assert local_files_only_for(str(tmp_path), what="--model", instead="") is False  # a folder: nothing to fetch
    assert local_files_only_for("/no/such/folder", what="--model", instead="") is False  # from_pretrained says so


def test_debias_short_of_its_ratios_warns_per_concept(caplog):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    always_male = lambda images, labels: [labels[0]] * len(images)  # noqa: E731
    options = {"num_images": 2, "num_inference_steps": 1, "height": 16, "width": 16, "batch_size": 2}
    with caplog.at_level(logging.WARNING):
        out = pipe.debias_concepts({"doctor": ["male", "female"], "nurse": ["male", "female"]},
                                   classifier=always_male, max_iterations=1, options=options, held_out=[])
    missed = [r.getMessage() for r in caplog.records if "did not reach its ratios" in r.getMessage()]
    assert len(missed) == 2 and "'doctor'" in missed[0] and "'nurse'" in missed[1]
    assert "not reached within the budget: doctor, nurse" in str(out.report)

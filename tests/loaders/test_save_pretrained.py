"""Saving an edited pipeline is all or nothing: a save that dies midway leaves the folder as it was."""

import multiprocessing
import os

import pytest
from diffusers import StableDiffusionPipeline

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline


@pytest.fixture
def fused(tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    pipe.fuse_concept_edits()
    return pipe


def fail_midway(pipe, monkeypatch):
    """The UNet's save raises after the text encoder (saved before it) is written: a save killed midway."""

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe.unet, "save_pretrained", broken)


def test_failed_save_into_a_new_folder_leaves_nothing(fused, tmp_path, monkeypatch):
    fail_midway(fused, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fused.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_failed_save_over_a_saved_pipeline_keeps_it_loadable(fused, tmp_path, monkeypatch):
    fused.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    fail_midway(fused, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fused.save_pretrained(tmp_path / "out")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    assert os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()
    fused.save_pretrained(tmp_path / "out")  # a second save over it swaps every entry in, and keeps other files
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    StableDiffusionPipeline.from_pretrained(tmp_path / "out")


def test_folder_left_by_a_killed_save_is_removed_by_the_next(fused, tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    stale = tmp_path / f".out.{dead.pid}.0123abcd.tmp"
    (stale / "unet").mkdir(parents=True)
    fused.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]

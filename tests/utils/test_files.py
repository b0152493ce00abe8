"""Saves that never lose data: exclusive creation, edit file + card as one unit, stale temporaries cleaned."""

import json
import multiprocessing
import os

import pytest
import safetensors

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.utils import files
from diffusers_uce.utils.files import atomic_path, remove_stale_temporaries, write_text_atomic


def test_exclusive_write_never_replaces_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    """Another writer creates the file after our last look and before ours is moved into place: ours is refused
    and theirs is kept (a check-then-rename would silently replace it)."""
    target = tmp_path / "uce_edits.safetensors"
    real_fsync = os.fsync

    def competitor_writes_then_fsync(fd):
        if not target.exists():
            target.write_text("the other writer's file")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", competitor_writes_then_fsync)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_path(target, overwrite=False) as tmp:
            with open(tmp, "w") as f:
                f.write("ours")
    assert target.read_text() == "the other writer's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uce_edits.safetensors"]  # no temporary left


def test_overwrite_replaces(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "one")
    write_text_atomic(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    with pytest.raises(FileExistsError):
        write_text_atomic(tmp_path / "a.txt", "three", overwrite=False)
    assert (tmp_path / "a.txt").read_text() == "two"


def test_stale_temporaries_of_dead_writers_are_cleaned_on_the_next_save(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    stale = tmp_path / f".uce_edits.safetensors.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".uce_edits.safetensors.{os.getppid()}.4567ef01.tmp"  # a writer still running
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    write_text_atomic(tmp_path / "README.md", "# card")
    assert not stale.exists() and live.exists() and (tmp_path / "README.md").exists()
    assert remove_stale_temporaries(tmp_path) == []


def _save(pipe, folder, barrier, overwrite, queue):
    barrier.wait()
    try:
        pipe.save_concept_edits(folder, overwrite=overwrite, overwrite_model_card=overwrite)
        queue.put("saved")
    except FileExistsError:
        queue.put("refused")


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_saving_into_one_new_folder(tmp_path, overwrite):
    """Both processes race for the same new folder: without overwrite one save is refused; either way the folder
    holds one edit, and its card describes that edit."""
    pipes = {}
    for concept in ("van gogh", "picasso"):
        pipes[concept] = diffusers_uce.attach(make_demo_pipeline("sd1"))
        pipes[concept].apply_concept_edits([concept], guide="art", held_out=[])
    ctx = multiprocessing.get_context("fork")
    for trial in range(4):
        folder = tmp_path / f"trial{trial}"
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        workers = [ctx.Process(target=_save, args=(p, folder, barrier, overwrite, queue)) for p in pipes.values()]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        outcomes = sorted(queue.get(timeout=10) for _ in workers)
        assert outcomes == (["saved", "saved"] if overwrite else ["refused", "saved"]), outcomes
        with safetensors.safe_open(folder / "uce_edits.safetensors", "pt") as f:
            erased = json.loads(f.metadata()["uce"])["edits"][0]["erase"]
        card = (folder / "README.md").read_text()
        other = next(c for c in pipes if [c] != erased)
        assert erased[0] in card and other not in card, (erased, trial)
        assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]

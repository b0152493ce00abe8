"""Saves killed (or failing) at every rename leave a folder that is entirely the old save or entirely the new one: the
edit file with its own card, the saved pipeline with all its components from one save. Every writer refuses weights
that are not finite (after its cast) before writing anything."""

import json
import multiprocessing
import os

import pytest
import safetensors
import torch
from diffusers import StableDiffusionPipeline

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders import lora
from diffusers_uce.utils import files, folders

CONCEPTS = ("van gogh", "picasso")


def edited(concept, fuse=False):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits([concept], guide="art", held_out=[])
    if fuse:
        pipe.fuse_concept_edits()
    return pipe


class Steps:
    """Counts the renames of a save (`os.rename`, `os.replace`, the folder exchange); at call `fail_at` it raises, or
    with `kill` ends the process there (nothing cleans up)."""

    def __init__(self, monkeypatch, fail_at=None, kill=False):
        self.calls, self.fail_at, self.kill = 0, fail_at, kill
        for owner, name in ((os, "rename"), (os, "replace"), (folders, "_exchange")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, real):
        def step(*args, **kwargs):
            if self.calls == self.fail_at:
                if self.kill:
                    os._exit(9)
                raise OSError("injected failure")
            self.calls += 1
            return real(*args, **kwargs)
        return step


def run_killed(target, monkeypatch, fail_at):
    def child():
        Steps(monkeypatch, fail_at, kill=True)
        target()
        os._exit(0)

    worker = multiprocessing.get_context("fork").Process(target=child)
    worker.start()
    worker.join(60)
    return worker.exitcode


def count_steps(target, monkeypatch):
    with monkeypatch.context() as m:
        steps = Steps(m)
        target()
    return steps.calls


# ---------------------------------------------------------------- edit file and card
def pair(folder):
    with safetensors.safe_open(folder / "uce_edits.safetensors", "pt") as f:
        erased = json.loads(f.metadata()["uce"])["edits"][0]["erase"][0]
    card = (folder / "README.md").read_text()
    assert erased in card and all(c not in card for c in CONCEPTS if c != erased), ("card and file disagree", erased)
    return erased


@pytest.fixture(scope="module")
def two_edits():
    return [edited(c) for c in CONCEPTS]


@pytest.mark.parametrize("kill", [False, True])
def test_edit_file_and_card_always_match(two_edits, tmp_path, monkeypatch, kill):
    old, new = two_edits
    out = tmp_path / "out"
    save_new = lambda: new.save_concept_edits(out, overwrite=True)  # noqa: E731
    old.save_concept_edits(out)
    total = count_steps(save_new, monkeypatch)
    assert pair(out) == CONCEPTS[1]
    for fail_at in range(total):
        old.save_concept_edits(out, overwrite=True)
        if kill:
            assert run_killed(save_new, monkeypatch, fail_at) == 9
        else:
            with monkeypatch.context() as m, pytest.raises(OSError, match="injected"):
                Steps(m, fail_at)
                save_new()
        assert pair(out) in CONCEPTS, fail_at
        save_new()  # the next save cleans what the killed one left
        assert pair(out) == CONCEPTS[1]
        assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["README.md",
                                                                                        "uce_edits.safetensors"]


# ---------------------------------------------------------------- save_pretrained
def component_weights(pipe):
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "text_encoder", "vae")}


def which(folder, expected):
    """The name of the save in `expected` that the folder holds, component by component (all must agree)."""
    loaded = component_weights(StableDiffusionPipeline.from_pretrained(folder))
    owners = set()
    for component, state in loaded.items():
        match = [name for name, weights in expected.items()
                 if all(torch.equal(state[k], weights[component][k]) for k in state)]
        assert match, f"{component} is from no save"
        owners.add(match[0])
    assert len(owners) == 1, f"a mixed folder: {owners}"
    return owners.pop()


@pytest.fixture(scope="module")
def two_saves():
    old, new = edited(CONCEPTS[0], fuse=True), edited(CONCEPTS[1], fuse=True)
    with torch.no_grad():  # every component differs between the two saves
        for module in (new.text_encoder, new.vae):
            next(module.parameters()).add_(0.5)
    return old, new, {"old": component_weights(old), "new": component_weights(new)}


@pytest.mark.parametrize("fail_at", range(4))  # every step of a save: 2 with the exchange, 4 without
@pytest.mark.parametrize("exchange", [True, False])
def test_save_pretrained_killed_at_every_rename_loads_old_or_new(two_saves, tmp_path, monkeypatch, exchange,
                                                                 fail_at):
    old, new, expected = two_saves
    out = tmp_path / "out"
    if not exchange:  # the two-rename switch of systems without an atomic exchange
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    save_new = lambda: new.save_pretrained(out)  # noqa: E731
    old.save_pretrained(out)
    total = count_steps(save_new, monkeypatch)
    assert total == (2 if exchange else 4) and which(out, expected) == "new"
    if fail_at >= total:
        return
    old.save_pretrained(out)
    assert run_killed(save_new, monkeypatch, fail_at) == 9
    if not out.exists():  # only between the two renames of the fallback: the next save moves the old back
        assert not exchange
        files.remove_stale_temporaries(tmp_path)
    assert which(out, expected) in ("old", "new"), fail_at
    save_new()
    assert which(out, expected) == "new" and sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------- finiteness
def poison(pipe):
    """A weight of an edited layer beyond float16's range (as a strong fused edit can make it)."""
    with torch.no_grad():
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight[0, 0] = 1e6


def test_single_file_in_float16_refuses_an_overflow(tmp_path):
    pipe = edited(CONCEPTS[0], fuse=True)
    poison(pipe)
    with pytest.raises(ValueError, match="does not fit in torch.float16"):
        pipe.save_single_file(tmp_path / "model.safetensors", dtype=torch.float16)
    assert os.listdir(tmp_path) == []
    pipe.save_single_file(tmp_path / "model.safetensors")  # float32 holds it


@pytest.mark.parametrize("writer", ["lora", "edit_file", "save_pretrained"])
def test_writers_refuse_non_finite_weights(tmp_path, writer, monkeypatch):
    pipe = edited(CONCEPTS[0], fuse=writer == "save_pretrained")
    group = pipe._uce_state.groups[0]
    real_factors = lora.lora_factors

    def overflowing(*args, **kwargs):  # finite in float64, beyond float32 once the factors are cast for the file
        factors = real_factors(*args, **kwargs)
        factors[0].up[0][0, 0] = 1e300
        return factors

    with torch.no_grad():
        if writer == "lora":
            monkeypatch.setattr(lora, "lora_factors", overflowing)
        elif writer == "edit_file":
            group.solution.transform[0, 0] = float("inf")
        else:
            group.projections[0].module.weight[0, 0] = float("inf")
    save = {"lora": lambda: pipe.save_concept_edits_as_lora(tmp_path / "out"),
            "edit_file": lambda: pipe.save_concept_edits(tmp_path / "out"),
            "save_pretrained": lambda: pipe.save_pretrained(tmp_path / "out")}[writer]
    with pytest.raises(ValueError, match="non-finite"):
        save()
    assert os.listdir(tmp_path) == []

"""One pipeline edited from several threads (and its edits saved and loaded by several processes): no edit is lost
and unloading restores the weights bit for bit."""

import multiprocessing
import threading

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import target_layers

CONCEPTS = ["van gogh", "picasso", "monet", "rembrandt"]


def parameters(pipe):
    return {f"{n}.{k}": p.detach().clone() for n, m in target_layers(pipe) for k, p in m.named_parameters()}


def run_together(*jobs):
    """Start every job at the same moment in its own thread; re-raise the first error."""
    barrier, errors = threading.Barrier(len(jobs)), []

    def wrap(job):
        barrier.wait()
        try:
            job()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]


@pytest.fixture
def sd1():
    return diffusers_uce.attach(make_demo_pipeline("sd1"))


def test_concurrent_applies_all_take_effect(sd1):
    for _ in range(3):
        run_together(*(lambda c=c: sd1.apply_concept_edits(c, guide="art", held_out=[]) for c in CONCEPTS))
        assert sorted(e.erase[0] for e in sd1.concept_edits) == sorted(CONCEPTS)
        sd1.unload_concept_edits()


def test_state_changes_racing_leave_no_trace_after_unload(sd1):
    original = parameters(sd1)
    processors = dict(sd1.unet.attn_processors)
    sd1.apply_concept_edits("van gogh", guide="art", held_out=[])

    def applies():
        for concept in CONCEPTS[1:]:
            sd1.apply_concept_edits(concept, guide="art", held_out=[])

    def fuses():
        for _ in range(6):
            sd1.fuse_concept_edits()
            sd1.unfuse_concept_edits()

    def scales():
        for scale in (0.5, 2.0, 1.0, 0.0, 1.0):
            sd1.set_concept_edit_scale(scale)

    run_together(applies, fuses, scales)
    assert len(sd1.concept_edits) == len(CONCEPTS)
    sd1.fuse_concept_edits()
    sd1.unload_concept_edits()
    assert all(torch.equal(p, original[n]) for n, p in parameters(sd1).items())
    assert all(sd1.unet.attn_processors[k] is v for k, v in processors.items())


def _load_and_report(path, queue):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.load_concept_edits(path)
    queue.put(sorted(e.erase[0] for e in pipe.concept_edits))


@pytest.mark.slow
def test_stress_threads_and_processes(sd1, tmp_path):
    """Threads apply, fuse, save and load on one pipeline while processes load what was saved."""
    original = parameters(sd1)
    other = diffusers_uce.attach(make_demo_pipeline("sd1"))
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"

        def applies():
            for concept in CONCEPTS:
                sd1.apply_concept_edits(concept, guide="art", held_out=[])

        def fuses():
            for _ in range(3):
                if sd1.concept_edits:
                    sd1.fuse_concept_edits()
                    sd1.unfuse_concept_edits()

        run_together(applies, fuses)
        sd1.save_concept_edits(folder)
        queue = ctx.Queue()
        workers = [ctx.Process(target=_load_and_report, args=(folder, queue)) for _ in range(2)]
        for worker in workers:
            worker.start()

        def loads(folder=folder):
            other.unload_concept_edits()
            other.load_concept_edits(folder)

        run_together(loads, lambda folder=folder: sd1.save_concept_edits(folder / "copy"))
        for worker in workers:
            worker.join(120)
        assert [queue.get(timeout=10) for _ in workers] == [sorted(CONCEPTS)] * 2
        assert sorted(e.erase[0] for e in other.concept_edits) == sorted(CONCEPTS)
        sd1.unload_concept_edits()
        assert all(torch.equal(p, original[n]) for n, p in parameters(sd1).items())

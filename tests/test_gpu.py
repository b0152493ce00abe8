"""The device path: every demo family in float32, float16 and bfloat16 on an accelerator, against a CPU float32 solve.

Runs on CUDA when `torch.cuda.is_available()` and skips otherwise. `DIFFUSERS_UCE_TEST_DEVICE` picks another device:
`DIFFUSERS_UCE_TEST_DEVICE=cpu` runs the same checks on the CPU (model offload, which needs an accelerator, skips), so
their logic is tested without a GPU; `cuda:1` picks a second GPU.

    pytest -m gpu tests/test_gpu.py                                   # on a machine with a GPU
    DIFFUSERS_UCE_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py      # the same logic on the CPU
"""

import dataclasses
import os

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import DEMO_FAMILIES, make_demo_pipeline
from tests.support.helpers import rel, weights

DEVICE = os.environ.get("DIFFUSERS_UCE_TEST_DEVICE", "cuda")
ON_CUDA = torch.device(DEVICE).type == "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (DIFFUSERS_UCE_TEST_DEVICE=cpu runs "
                                                         "these checks on the CPU)")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Fused weights of the device pipeline (in its dtype) against the CPU float32 solve, ‖W'_dev − W'_cpu‖ / ‖W'_cpu‖: the
# weights themselves are rounded to the dtype (2^-11, 2^-8) and the text encoder runs in it.
WEIGHT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# One rounding of the weights to the dtype, relative.
ROUNDING = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Denoiser outputs, processor mode against fused, relative.
OUTPUT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
ERASE, GUIDE, PRESERVE = ["van gogh", "picasso"], "art", ["monet"]
PROMPT = "a painting by van gogh"
SPEED_OPTIONS = dict(threshold=1e-3, augment=3, seed=2)


@pytest.fixture(params=DEMO_FAMILIES)
def demo_family(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


def device_pipe(family, dtype):
    return diffusers_uce.attach(make_demo_pipeline(family, torch_dtype=dtype, device=DEVICE))


def cpu_pipe(family):
    return diffusers_uce.attach(make_demo_pipeline(family))


def edit(pipe, **kwargs):
    return pipe.apply_concept_edits(ERASE, guide=GUIDE, preserve=PRESERVE, held_out=[], **kwargs)


def generate(pipe, steps=2):
    """Latents of a short generation from fixed noise (the pipeline's own prompt encoding and denoiser)."""
    video = {"num_frames": 5} if type(pipe).__name__.endswith("WanPipeline") else {}
    out = pipe(prompt=PROMPT, num_inference_steps=steps, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0), **video)
    return (out.images if hasattr(out, "images") else out.frames).float().cpu()


def solved(group):
    """The tensor a group's solution is held in: its shared transform, or its low-rank factors."""
    solution = group.solution
    return solution.transform if solution.transform is not None else solution.layerwise.up


def assert_on_device(pipe, dtype):
    """The solution lives on the pipeline's device (solved there) and the edited weights kept their dtype/device."""
    for group in pipe._uce_state.groups:
        assert solved(group).device.type == torch.device(DEVICE).type
    for name, w in weights(pipe).items():
        assert w.device.type == torch.device(DEVICE).type and w.dtype == dtype, name


def assert_weights_match(device, reference, dtype):
    for (name, a), b in zip(reference.items(), device.values()):
        assert torch.isfinite(b).all(), name
        assert rel(b.cpu(), a) < WEIGHT_TOL[dtype], (name, rel(b.cpu(), a))


def fused_after(pipe, **kwargs):
    out = edit(pipe, **kwargs)
    pipe.fuse_concept_edits()
    return out, weights(pipe)


def test_solve_on_device_matches_cpu_float32(demo_family, dtype):
    _, expected = fused_after(cpu_pipe(demo_family))
    pipe = device_pipe(demo_family, dtype)
    _, fused = fused_after(pipe)
    assert_on_device(pipe, dtype)
    assert_weights_match(fused, expected, dtype)


def test_fuse_unfuse_unload_bit_for_bit(demo_family, dtype):
    pipe = device_pipe(demo_family, dtype)
    original = weights(pipe)
    processors = dict(pipe.unet.attn_processors) if hasattr(pipe, "unet") else None
    plain = generate(pipe)
    edit(pipe)
    processor_mode = generate(pipe)
    pipe.fuse_concept_edits()
    assert any(not torch.equal(w, original[n]) for n, w in weights(pipe).items())
    fused = generate(pipe)
    assert rel(fused, processor_mode) < OUTPUT_TOL[dtype]  # the processors compute what the fused weights do
    if dtype == torch.float32:  # it acts, well above the processor/fused difference (in half precision a random
        assert rel(processor_mode, plain) > 10 * rel(fused, processor_mode)  # demo's effect can be below rounding)
    pipe.unfuse_concept_edits()
    assert all(torch.equal(w, original[n]) for n, w in weights(pipe).items())
    assert torch.equal(generate(pipe), processor_mode)
    pipe.fuse_concept_edits()
    pipe.unload_concept_edits()
    assert all(torch.equal(w, original[n]) for n, w in weights(pipe).items())
    if processors is not None:
        assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(generate(pipe), plain)


def test_edit_file_round_trip(demo_family, dtype, tmp_path):
    pipe = device_pipe(demo_family, dtype)
    edit(pipe)
    pipe.save_concept_edits(tmp_path, write_model_card=False)
    other = device_pipe(demo_family, dtype)
    other.load_concept_edits(tmp_path)  # verify=True: solves again on the device and compares
    for a, b in zip(pipe._uce_state.groups, other._uce_state.groups):
        assert torch.equal(solved(a).cpu(), solved(b).cpu())
        assert solved(b).device.type == torch.device(DEVICE).type
    assert torch.equal(generate(other), generate(pipe))  # the processors apply the same T
    pipe.fuse_concept_edits()
    other.fuse_concept_edits()
    # an applied edit with few tokens fuses through its low-rank form, a loaded one through T (the file stores T):
    # the same weights up to the rounding of the dtype
    for (name, a), b in zip(weights(pipe).items(), weights(other).values()):
        assert rel(b, a) < ROUNDING[dtype], name


def test_lora_export_on_device(demo_family, dtype, tmp_path):
    pytest.importorskip("peft")
    pipe = device_pipe(demo_family, dtype)
    if not hasattr(pipe, "load_lora_weights"):
        pytest.skip(f"diffusers has no LoRA loader for {type(pipe).__name__}")
    edit(pipe)
    error = pipe.save_concept_edits_as_lora(tmp_path, write_model_card=False)
    assert error < 1e-5
    pipe.fuse_concept_edits()
    plain = make_demo_pipeline(demo_family, torch_dtype=dtype, device=DEVICE)
    plain.load_lora_weights(tmp_path)
    plain.fuse_lora()
    fused = weights(pipe)
    lora = weights(plain)
    for name, w in fused.items():
        # the LoRA product is rounded to the dtype once more when fuse_lora adds it: a few ulps of W
        assert rel(lora[name].float(), w.float()) < WEIGHT_TOL[dtype] / 2 + 1e-6, name


def recorded_encodings(pipe) -> dict:
    """Make `pipe` keep every text encoding its solves use (by target group, prompts and length)."""
    recorded, encode = {}, pipe._uce_encode

    def keep(group, prompts, last_only, device):
        recorded[(group.name, tuple(prompts), last_only)] = out = encode(group, prompts, last_only, device)
        return out

    pipe._uce_encode = keep
    return recorded


def replaying(pipe, recorded: dict):
    """Make `pipe` solve from `recorded` encodings (in float32 on its device) instead of encoding."""
    pipe._uce_encode = lambda group, prompts, last_only, device: dataclasses.replace(
        e := recorded[(group.name, tuple(prompts), last_only)], states=e.states.to(device, torch.float32),
        last=e.last.to(device))
    return pipe


def same_states_reference(family, dtype, recorded):
    """A CPU float32 pipeline with the device pipeline's weights (rounded to `dtype`) that solves from the device
    pipeline's text encodings: hardening and precise erasure amplify the text encoder's rounding in float16/bfloat16,
    so what is compared is the solve itself."""
    return replaying(diffusers_uce.attach(make_demo_pipeline(family, torch_dtype=dtype).to(torch.float32)), recorded)


def test_hardening_on_device_matches_cpu_float32(demo_family, dtype):
    pipe = device_pipe(demo_family, dtype)
    recorded = recorded_encodings(pipe)
    out, fused = fused_after(pipe, harden=2)
    assert_on_device(pipe, dtype)
    out_cpu, expected = fused_after(same_states_reference(demo_family, dtype, recorded), harden=2)
    assert_weights_match(fused, expected, dtype)
    for row, row_cpu in zip(out.report.robustness, out_cpu.report.robustness, strict=True):
        assert len(row["recovery"]) == 3  # before, then 2 rounds (the CPU solve gives the same, checked below)
        assert abs(row["recovery"][-1] - row_cpu["recovery"][-1]) < 1e-4


def test_speed_on_device_matches_cpu_float32(demo_family, dtype):
    pipe = device_pipe(demo_family, dtype)
    recorded = recorded_encodings(pipe)
    _, fused = fused_after(pipe, method="speed", method_options=SPEED_OPTIONS)
    assert_on_device(pipe, dtype)
    reference = same_states_reference(demo_family, dtype, recorded)
    _, expected = fused_after(reference, method="speed", method_options=SPEED_OPTIONS)
    assert_weights_match(fused, expected, dtype)


@pytest.mark.skipif(not ON_CUDA, reason="model offload moves models between the CPU and an accelerator")
def test_model_cpu_offload_with_an_edit(demo_family, dtype):
    pipe = device_pipe(demo_family, dtype)
    original = {n: w.cpu() for n, w in weights(pipe).items()}
    edit(pipe)
    processor_mode = generate(pipe)
    pipe.enable_model_cpu_offload(device=DEVICE)
    offloaded = generate(pipe)
    assert rel(offloaded, processor_mode) < OUTPUT_TOL[dtype]
    pipe.fuse_concept_edits()  # solved on the execution device, written to the offloaded (CPU) weights
    assert rel(generate(pipe), processor_mode) < OUTPUT_TOL[dtype]
    pipe.unload_concept_edits()
    assert all(torch.equal(w.cpu(), original[n]) for n, w in weights(pipe).items())

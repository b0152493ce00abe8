"""Checks that need what CI lacks: real Stable Diffusion weights (opt-in, never downloaded here). The device checks
(CUDA, every family and dtype) are in tests/test_gpu.py.

- Real-model tests run only when `UCE_TEST_MODEL` names a local folder or a cached Hub id of an SD 1.x/2.x
  pipeline (e.g. `UCE_TEST_MODEL=CompVis/stable-diffusion-v1-4`), loaded with `local_files_only=True`.
"""

import os

import pytest
import torch

import diffusers_uce

REAL_MODEL = os.environ.get("UCE_TEST_MODEL")
real = pytest.mark.skipif(not REAL_MODEL, reason="set UCE_TEST_MODEL to a local/cached SD pipeline to run")


@real
def test_real_model_erasure_report():
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(REAL_MODEL, local_files_only=True).to(device)
    pipe = diffusers_uce.attach(pipe)
    out = pipe.apply_concept_edits(["Van Gogh", "Kelly McKernan"], guide="art",
                                   preserve=["Claude Monet", "Rembrandt"])
    assert min(r["efficacy"] for r in out.report.erased) > 0.8
    assert max(r["interference"] for r in out.report.preserved) < 0.1
    image = pipe("The starry night by Van Gogh", num_inference_steps=5,
                 generator=torch.Generator(device).manual_seed(0)).images[0]
    assert image.size[0] > 0
    pipe.unload_concept_edits()
    assert pipe.concept_edits == ()

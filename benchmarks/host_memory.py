"""Peak extra host memory of the writers of an edited pipeline, SDXL shapes with random weights.

Builds an SDXL-shaped pipeline at real sizes in float16 (the UNet, both text encoders and the VAE: about 6.9 GB;
float16 is what SDXL is distributed in, and keeps the run within a 24 GB machine shared with others), applies and
fuses an edit, and measures, for each writer, the peak resident memory of this process above what it held just
before the call (psutil, sampled every 2 ms by a thread; freed heap memory returned to the system first with
``malloc_trim``), as a ratio of the model's size:

- `save_concept_edits_as_lora` (exact rank, before fusing),
- `save_single_file(dtype=torch.float16)` (after fusing),
- `save_pretrained` (after fusing).

Resident memory counts every allocation of the process (torch, Python, safetensors' native code), not the page cache
of the files written. Run: ``python benchmarks/host_memory.py`` (``--tiny`` for a quick check of the code path); the
table goes into `benchmarks/RESULTS.md`, section "Host memory of the writers".
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_md  # noqa: E402
import shapes  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

import diffusers_uce  # noqa: E402

HEADING = "Host memory of the writers: SDXL shapes"
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.13025)  # stabilityai/sdxl-vae
TINY_VAE = dict(SDXL_VAE, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32)


def build(tiny: bool):
    pipe = shapes.build_pipeline("sdxl", tiny=tiny)
    generator = torch.Generator().manual_seed(3)
    for module in pipe.unet.modules():  # the rest of the meta UNet, drawn in float16, one tensor at a time
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        pipe.register_modules(vae=AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE)))
    pipe.to(torch.float16)
    return diffusers_uce.attach(pipe)


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra(call) -> tuple[int, float]:
    """(peak resident bytes above the start, seconds) of `call()`."""
    process = psutil.Process()
    trim()
    start = process.memory_info().rss
    peak, done = [start], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    try:
        call()
    finally:
        seconds = time.perf_counter() - began
        done.set()
        sampler.join()
    return max(peak[0], process.memory_info().rss) - start, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (checks the code path only)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--workdir", default=None, help="where the files are written (a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    built = time.perf_counter()
    pipe = build(args.tiny)
    model = sum(t.numel() * t.element_size() for c in ("unet", "text_encoder", "text_encoder_2", "vae")
                for t in getattr(pipe, c).state_dict().values())
    pipe.apply_concept_edits(["van gogh"], guide="art", held_out=[])
    built = time.perf_counter() - built
    work = Path(tempfile.mkdtemp(prefix="uce-host-memory-", dir=args.workdir))
    rows = []
    try:
        rows.append(("save_concept_edits_as_lora (exact rank)",
                     *peak_extra(lambda: pipe.save_concept_edits_as_lora(work / "lora"))))
        pipe.fuse_concept_edits()
        rows.append(("save_single_file(dtype=torch.float16)",
                     *peak_extra(lambda: pipe.save_single_file(work / "sdxl.safetensors", dtype=torch.float16))))
        (work / "sdxl.safetensors").unlink()
        rows.append(("save_pretrained", *peak_extra(lambda: pipe.save_pretrained(work / "pipeline"))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = 1024 ** 3
    lines = [f"Written by `benchmarks/host_memory.py`{' --tiny' if args.tiny else ''}. Machine: "
             f"{results_md.machine('cpu')} (shared with other work: resident memory is this process's own). "
             f"SDXL-shaped pipeline, random weights, float16, UNet + both text encoders + VAE at real sizes: "
             f"{model / gib:.2f} GiB of weights (built and edited in {built:.0f} s). Peak extra = the process's peak "
             "resident memory during the call minus just before it (sampled every 2 ms). Target: under 25 % of the "
             "model's size.", "",
             "| writer | peak extra host memory | ratio to the model | time |", "| --- | --- | --- | --- |"]
    for name, extra, seconds in rows:
        lines.append(f"| `{name}` | {extra / gib:.3f} GiB | {100 * extra / model:.1f} % | {seconds:.1f} s |")
    verdict = all(extra < 0.25 * model for _, extra, _ in rows)
    lines += ["", f"Target met: {'yes' if verdict else 'no'}."]
    print("\n".join(lines))
    if not args.tiny:
        results_md.write_section(args.output, HEADING, lines)


if __name__ == "__main__":
    main()

"""GPU benchmarks of diffusers_uce: edit time, generation overhead, torch.compile and device memory of an edit.

    python benchmarks/gpu_speed.py [--parts edit generation compile memory] [--rounds 8] [--output RESULTS.md]
    python benchmarks/gpu_speed.py --smoke            # tiny shapes on the CPU: the same code paths, in seconds

Pipelines are benchmarks/shapes.py's (real shapes, seeded random weights, no VAE: latents out).

- edit: `apply_concept_edits` + `fuse_concept_edits` at N = 1, 100, 1000 ("last", SD 1.5 shapes, float32), split
  into text encoding and the rest (solve, report), best of `--edit-repeats`.
- generation: plain vs processor mode vs fused, interleaved rounds (SD 1.5 fp16 512² batch 4 25 steps; SDXL fp16
  1024²; FLUX bf16 1024²), with full-size random denoisers (built on the device with diffusers' own init) and the
  tiny-depth text towers of shapes.py. Overheads are per-round paired ratios against plain: mean ± 2 standard errors.
- compile: `unet.compile()` (in place, so the plugin still finds its layers) with an edit in processor mode, then
  fused: graphs compiled per phase (a second generation must compile none: no recompilation per step) and the
  speed-up over eager.
- memory: peak device memory of apply + fuse on SDXL and FLUX against the denoiser's weight size.

The results replace the "GPU" section of `--output` (other sections are kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

import diffusers_uce

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import edit_speed  # noqa: E402
import results_md  # noqa: E402
import shapes  # noqa: E402

HEADING = "GPU"
PROMPT = "a painting of a starry night by van gogh"
EDIT = dict(erase=["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=[])
GENERATION = {  # family: (dtype, size, batch, steps) at full size
    "sd15": (torch.float16, 512, 4, 25), "sdxl": (torch.float16, 1024, 1, 10), "flux": (torch.bfloat16, 1024, 1, 4)}
DENOISERS = {"sd15": (UNet2DConditionModel, shapes.SD15_UNET, dict(shapes.TINY_UNET, cross_attention_dim=32)),
             "sdxl": (UNet2DConditionModel, shapes.SDXL_UNET, shapes.TINY_SDXL_UNET),
             "flux": (FluxTransformer2DModel, shapes.FLUX_TRANSFORMER, shapes.TINY_FLUX_TRANSFORMER)}
WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lumen", "marble", "nectar", "onyx", "prairie", "quartz", "russet", "sable", "tundra")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def concepts(n: int) -> tuple[list[str], list[str]]:
    """The artists of edit_speed.concepts when the paper's lists are there; otherwise 2n distinct made-up names."""
    try:
        return edit_speed.concepts(n)
    except (OSError, ValueError):
        names = [f"{WORDS[i % 20]} {WORDS[i // 20 % 20]} {WORDS[i // 400 % 20]}" for i in range(2 * n)]
        return names[:n], names[n:]


# ---------------------------------------------------------------- (a) edit time
def bench_edit(args) -> list[str]:
    pipe = edit_speed.build_sd15_pipeline(args.device, tiny=args.smoke)
    rows = ["| N | apply (s) | of which encoding (s) | solve + report (s) | fuse (s) | total (s) |", "|---" * 6 + "|"]
    for n in args.sizes:
        erase, preserve = concepts(n)
        t, _ = edit_speed.time_package(pipe, erase, preserve, "last", args.device, args.edit_repeats, keep=False,
                                       held_out=[])
        rows.append(f"| {n} | {t['apply']:.3f} | {t['encode']:.3f} | {t['apply'] - t['encode']:.3f} | "
                    f"{t['fuse']:.3f} | {t['apply'] + t['fuse']:.3f} |")
        print(rows[-1], flush=True)
    total_max = float(rows[-1].split("|")[-2])
    return ["### Edit time (SD 1.5 shapes, \"last\", float32, `held_out=[]`)", "",
            f"Best of {args.edit_repeats} fresh runs (encoding cache cleared). Target: N = {args.sizes[-1]} under "
            f"0.5 s on an H200-class GPU: {total_max:.3f} s.", "", *rows, ""]


# ---------------------------------------------------------------- pipelines with full denoisers
def generation_pipeline(family, args):
    """shapes.build_pipeline's text towers (2 layers for the second tower) and a full random denoiser."""
    dtype, size, batch, steps = GENERATION[family]
    if args.smoke:
        dtype, size, batch, steps = torch.float32, 32, 1, 2
    pipe = shapes.build_pipeline(family, args.device, tiny=args.smoke, text_layers=2)
    cls, config, tiny = DENOISERS[family]
    torch.manual_seed(0)
    with torch.device(args.device):
        denoiser = cls(**(tiny if args.smoke else config))
    pipe.register_modules(**{"transformer" if family == "flux" else "unet": denoiser.eval()})
    pipe.to(dtype=dtype)
    return diffusers_uce.attach(pipe), dict(dtype=dtype, size=size, batch=batch, steps=steps)


def denoiser_of(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def generate(pipe, spec):
    kwargs = {} if hasattr(pipe, "transformer") else {"guidance_scale": 7.5}
    out = pipe([PROMPT] * spec["batch"], height=spec["size"], width=spec["size"],
               num_inference_steps=spec["steps"], output_type="latent",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images


def timed(pipe, spec, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    generate(pipe, spec)
    sync(device)
    return time.perf_counter() - t0


def set_mode(pipe, mode):
    """"plain" (no edit), "processor" (edit applied) or "fused"; the same edit every time (encodings are cached)."""
    if pipe.concept_edits and mode != "fused" and pipe.concept_edits_fused:
        pipe.unfuse_concept_edits()
    if mode == "plain":
        if pipe.concept_edits:
            pipe.unload_concept_edits()
        return
    if not pipe.concept_edits:
        pipe.apply_concept_edits(**EDIT)
    if mode == "fused" and not pipe.concept_edits_fused:
        pipe.fuse_concept_edits()


def summary(times, plain) -> str:
    ratios = [t / p for t, p in zip(times, plain)]
    mean, sem = statistics.fmean(ratios), statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0
    spread = statistics.stdev(times) / statistics.fmean(times) if len(times) > 1 else 0
    return (f"{statistics.fmean(times):.4f} | ±{100 * spread:.1f} % | {100 * (mean - 1):+.2f} % ± {200 * sem:.2f} % "
            f"| {min(times):.4f}")


def bench_generation(args) -> list[str]:
    lines = ["### Generation: plain vs processor mode vs fused", "",
             f"{args.rounds} interleaved rounds after one warm-up of each mode (the order rotates every round). "
             "Spread: standard deviation between rounds / mean. Overhead: mean of the per-round ratio to plain − 1, "
             "± 2 standard errors (an overhead inside that band is not measurable with these rounds).", ""]
    for family in args.families:
        pipe, spec = generation_pipeline(family, args)
        modes = ("plain", "processor", "fused")
        times = {m: [] for m in modes}
        for mode in modes:  # warm-up (and the one solve)
            set_mode(pipe, mode)
            generate(pipe, spec)
        for r in range(args.rounds):
            for mode in modes[r % 3:] + modes[: r % 3]:
                set_mode(pipe, mode)
                times[mode].append(timed(pipe, spec, args.device))
        lines += [f"{shapes.TITLES[family]}: {spec['dtype']}, {spec['size']}², batch {spec['batch']}, "
                  f"{spec['steps']} steps, denoiser {weight_bytes(denoiser_of(pipe)) / 2**30:.2f} GiB.", "",
                  "| mode | mean (s) | spread | overhead vs plain | best (s) |", "|---" * 5 + "|"]
        lines += [f"| {m} | {summary(times[m], times['plain'])} |" for m in modes] + [""]
        print("\n".join(lines[-5:]), flush=True)
        del pipe
        empty_cache(args.device)
    return lines


# ---------------------------------------------------------------- (c) torch.compile
def graphs() -> int:
    """Graphs dynamo has compiled so far (a recompilation compiles one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def bench_compile(args) -> list[str]:
    import torch._dynamo

    torch._dynamo.reset()
    pipe, spec = generation_pipeline("sd15", args)
    eager = min(timed(pipe, spec, args.device) for _ in range(2))
    denoiser_of(pipe).compile(backend=args.compile_backend)
    rows = ["| phase | first generation (s) | graphs compiled by it | graph breaks | graphs compiled by the next | "
            "next (s) | eager/compiled |", "|---" * 7 + "|"]
    result = {}
    for phase in ("plain", "processor", "fused"):
        set_mode(pipe, phase)
        before, breaks = graphs(), graph_breaks()
        first = timed(pipe, spec, args.device)
        middle, breaks = graphs(), graph_breaks() - breaks
        steady = min(timed(pipe, spec, args.device) for _ in range(args.compile_repeats))
        result[phase] = (middle - before, graphs() - middle)
        rows.append(f"| {phase} | {first:.2f} | {middle - before} | {breaks} | {graphs() - middle} | {steady:.4f} | "
                    f"{eager / steady:.2f}× |")
        print(rows[-1], flush=True)
    bench_compile.result = result
    return [f"### torch.compile (SD 1.5, backend {args.compile_backend!r}, `unet.compile()`)", "",
            f"Eager plain: {eager:.4f} s. A phase's first generation compiles what it needs (a new processor or "
            "strength is a guard); the next generation must compile nothing (no recompilation per step).", "",
            *rows, ""]


# ---------------------------------------------------------------- (d) device memory
def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def empty_cache(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def bench_memory(args) -> list[str]:
    cuda = torch.device(args.device).type == "cuda"
    rows = ["| family | denoiser weights (GiB) | peak extra during apply (GiB) | peak extra during fuse (GiB) | "
            "held after fuse (GiB) | peak extra / weights |", "|---" * 6 + "|"]
    for family in [f for f in args.families if f != "sd15"]:
        pipe, _ = generation_pipeline(family, args)
        size = weight_bytes(denoiser_of(pipe))
        if not cuda:
            rows.append(f"| {shapes.TITLES[family]} | {size / 2**30:.3f} | not measured on {args.device} | — | — | — "
                        "|")
            continue
        sync(args.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pipe.apply_concept_edits(**EDIT)
        apply_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        pipe.fuse_concept_edits()
        fuse_peak = torch.cuda.max_memory_allocated() - base
        held = torch.cuda.memory_allocated() - base
        rows.append(f"| {shapes.TITLES[family]} | {size / 2**30:.2f} | {apply_peak / 2**30:.3f} | "
                    f"{fuse_peak / 2**30:.3f} | {held / 2**30:.3f} | {max(apply_peak, fuse_peak) / size:.3f} |")
        print(rows[-1], flush=True)
        del pipe
        empty_cache(args.device)
    return ["### Device memory of an edit (torch.cuda.max_memory_allocated above the loaded pipeline)", "",
            "Target: the edit must not double the denoiser's weights on the device (peak extra / weights well "
            "under 1).", "", *rows, ""]


PARTS = {"edit": bench_edit, "memory": bench_memory, "generation": bench_generation, "compile": bench_compile}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--families", nargs="+", default=list(shapes.FAMILIES), choices=shapes.FAMILIES)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000], help="N of the edit-time part")
    parser.add_argument("--edit-repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the generation part")
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--note", action="append", default=[], help="a line for the section's header (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: checks the code, no numbers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(edit_speed.ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.edit_repeats, args.rounds, args.compile_repeats = [1, 4], 1, 2, 1
        if "--compile-backend" not in (argv if argv is not None else sys.argv):
            args.compile_backend = "eager"
    header = [f"Machine: {results_md.machine(args.device)}", "",
              "Command: `python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`", ""]
    header += [line for note in args.note for line in (note, "")]
    if args.smoke:
        header += ["Smoke run (tiny shapes): these numbers check the code path, they measure nothing.", ""]
    body = list(header)
    with torch.inference_mode(False), torch.no_grad():
        for part in args.parts:
            body += PARTS[part](args)
            results_md.write_section(args.output, HEADING, body)
    return "\n".join(body)


if __name__ == "__main__":
    print(main())

"""Solve + fuse time of every family at its real layer shapes (random weights), N = 1, 10, 50 erased concepts.

    python benchmarks/family_speed.py [--output benchmarks/RESULTS.md] [--counts 1 10 50]

Only the edited layers are built (random float32 weights of the real shapes, no text encoders): each erased concept is
one random token of the layer's real input width ("last" mode: one token per concept, its guide one more), plus 5
preserved tokens. The time is the package's own path on those layers: `GroupEdit.stacked` + `engine.solve` (dense,
or the low-rank solve of wide groups, as `GroupEdit.takes_low_rank` decides) = "solve", and `GroupEdit.fused_weights`
(the new weights, not yet copied into the modules) = "fuse". Encoding prompts is not measured: it depends on the text
encoders, which are not built here. Results go to the "Families: solve + fuse at real shapes" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_uce.core import engine
from diffusers_uce.core import families as F
from diffusers_uce.core.solve import EditTerms
from diffusers_uce.core.targets import Projection
from diffusers_uce.loaders.edit_state import EditState, GroupEdit

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_md  # noqa: E402

HEADING = "Families: solve + fuse at real shapes"
PRESERVED = 5
SD15 = [320] * 5 + [640] * 5 + [1280] * 6  # per cross-attention block: to_k and to_v
SDXL = [640] * 10 + [1280] * 60


def _kv(outs: list[int], width: int) -> list[tuple[int, int, bool]]:
    return [(o, width, False) for o in outs for _ in range(2)]


# family -> (title, [(group, [(out, in, bias)])])
FAMILIES = {
    "sd15": ("SD 1.5", [(F.STABLE_DIFFUSION.groups[0], _kv(SD15, 768))]),
    "sdxl": ("SDXL", [(F.STABLE_DIFFUSION_XL.groups[0], _kv(SDXL, 2048))]),
    "flux": ("FLUX.1", [(F.FLUX.groups[0], [(3072, 4096, True)]), (F.FLUX.groups[1], [(3072, 768, True)])]),
    "sd35": ("SD3.5-large", [(F.SD3.groups[0], [(2432, 4096, True)]), (F.SD3.groups[1], [(2432, 2048, True)])]),
    "flux2": ("FLUX.2-dev", [(F.FLUX2.groups[0], [(6144, 15360, False)])]),
    "qwenimage": ("Qwen-Image", [(F.QWEN_IMAGE.groups[0], [(3072, 3584, True)])]),
    "hidream": ("HiDream-I1", [(replace(F.HIDREAM.groups[0], name=f"caption_projection.{i}", per_layer=False,
                                        layer_group=True), [(2560, 4096, False)]) for i in range(49)]),
    "sana": ("Sana-1600M", [(F.SANA.groups[0], _kv([2240] * 20, 2240))]),
    "pixart": ("PixArt-Σ", [(F.PIXART.groups[0], _kv([1152] * 28, 1152))]),
    "wan": ("Wan 2.1 14B (10 of 40 blocks)", [(F.WAN.groups[0], _kv([5120] * 10, 5120))]),
    "cogvideox": ("CogVideoX-5b", [(F.COGVIDEOX.groups[0], [(3072, 4096, True)])]),
}


def build(spec, seed: int = 0) -> tuple[EditState, list[GroupEdit]]:
    """Random layers of the given shapes, one `GroupEdit` per group."""
    g = torch.Generator().manual_seed(seed)
    state = EditState(True, None)
    groups = []
    for group, shapes in spec:
        projections = []
        for i, (out, width, bias) in enumerate(shapes):
            module = torch.nn.Linear(width, out, bias=bias, device="meta")
            module.weight = torch.nn.Parameter(torch.randn(out, width, generator=g) * width ** -0.5,
                                               requires_grad=False)
            if bias:
                module.bias = torch.nn.Parameter(torch.randn(out, generator=g) * 0.01, requires_grad=False)
            projections.append(Projection(f"layer{i}", "", module))
        groups.append(GroupEdit(state, group, projections))
    state.groups = groups
    return state, groups


def terms(n: int, width: int, seed: int) -> engine.AssembledTerms:
    """``n`` erased tokens with their guides and `PRESERVED` preserved tokens of width `width` ("last" mode)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    edit = EditTerms(erase=r(n, width), guide=r(n, width), erase_weight=torch.ones(n, dtype=torch.float64),
                     preserve=r(PRESERVED, width), preserve_weight=torch.ones(PRESERVED, dtype=torch.float64),
                     tensor_pair=torch.full((n,), -1), lamb=0.5)
    return engine.AssembledTerms(terms=edit, pairs=[(f"c{i}", "art") for i in range(n)], token_pair=torch.arange(n),
                                 preserved=[f"p{i}" for i in range(PRESERVED)],
                                 token_preserved=torch.arange(PRESERVED))


def measure(groups: list[GroupEdit], n: int) -> dict:
    """Seconds of the solve and of the fuse over every group, and how many groups took the low-rank path."""
    solve = fuse = 0.0
    low = 0
    for i, group in enumerate(groups):
        width = group.projections[0].module.weight.shape[1]
        assembled = terms(n, width, i)
        t0 = time.perf_counter()
        weights, row_layer = group.stacked("cpu")
        plain = weights[:, :-1] if group.biased else weights
        low_rank = group.takes_low_rank(n + PRESERVED)
        solution = engine.solve(assembled, plain, row_layer, len(group.projections), biased=group.biased,
                                low_rank=low_rank)
        del weights, plain
        t1 = time.perf_counter()
        group.set_solution(solution)
        group.fused_weights(1.0, "cpu")
        t2 = time.perf_counter()
        solve, fuse, low = solve + (t1 - t0), fuse + (t2 - t1), low + low_rank
        group.set_solution(None)
    return {"solve": solve, "fuse": fuse, "low": low}


def run(names, counts) -> list[str]:
    lines = ["Written by `benchmarks/family_speed.py`: every family's edited layers at their real shapes (random "
             "float32 weights; no text encoders: one random token of the real width per erased concept, \"last\" "
             f"mode, plus {PRESERVED} preserved tokens), through the package's `GroupEdit`/`engine.solve` path. "
             "\"solve\" = stacking the weights + the float64 solve; \"fuse\" = `GroupEdit.fused_weights` (new weights "
             "computed, not copied into the modules). Prompt encoding is not included.", "",
             f"Machine: {results_md.machine('cpu')} (a shared 2-core CPU: other jobs ran at the same time, so "
             "times are upper bounds).", "",
             "| family | edited layers (out × in) | groups | path | N | solve (s) | fuse (s) | solve + fuse (s) |",
             "|---" * 8 + "|"]
    for name in names:
        title, spec = FAMILIES[name]
        _, groups = build(spec)
        shapes = {}
        for group in groups:
            for p in group.projections:
                key = f"{p.module.weight.shape[0]}×{p.module.weight.shape[1]}"
                shapes[key] = shapes.get(key, 0) + 1
        layers = ", ".join(f"{c} × ({k})" for k, c in shapes.items())
        for n in counts:
            r = measure(groups, n)
            path = ("low-rank" if r["low"] == len(groups) else "dense" if r["low"] == 0
                    else f"{r['low']} low-rank")
            lines.append(f"| {title} | {layers} | {len(groups)} | {path} | {n} | {r['solve']:.2f} | "
                         f"{r['fuse']:.2f} | {r['solve'] + r['fuse']:.2f} |")
            print(lines[-1], flush=True)
        del groups
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--notes", default="", help="a paragraph added under the table")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    lines = run(args.families, args.counts)
    lines += ["", f"Total benchmark time {time.perf_counter() - t0:.0f} s."]
    if args.notes:
        lines += ["", args.notes]
    results_md.write_section(args.output, HEADING, lines)


if __name__ == "__main__":
    main()

"""Edit speed of diffusers_uce: against a straightforward per-layer UCE on an SD 1.5-shaped pipeline, and the solve
time
of SDXL- and FLUX-shaped pipelines.

    python benchmarks/edit_speed.py [--families sd15 sdxl flux] [--sizes 1 10 50 200 1000] [--modes last paper]
                                    [--baseline-max 200 50] [--family-sizes 1 10 50] [--family-modes last paper]
                                    [--device cpu|cuda] [--output benchmarks/RESULTS.md]

Pipelines (benchmarks/shapes.py) have the real models' shapes and seeded random weights; only what an edit reads is
materialised (text towers and target layers), the rest of the denoiser stays on the meta device, no VAE. N artists are
erased toward "art" while the next N are preserved.

- ``sd15`` (the default): SD 1.5 shapes (CLIP ViT-L/14, 16 attn2 = 32 projections), package vs the baseline
  (`baseline_solve`): the formula of DESIGN.md §1 written plainly: one full-length encoder call per prompt, a Python
  loop over concepts for each projection, an explicit inverse per layer.
- ``sdxl`` (SDXL 1.0 base: CLIP ViT-L + OpenCLIP bigG, 70 attn2 = 140 projections on 2048-wide tokens) and ``flux``
  (FLUX.1-dev: ``context_embedder`` on T5-XXL-shaped states padded to 512, ``text_embedder.linear_1`` on pooled CLIP;
  the T5 encoder keeps d_model 4096 but only ``--t5-layers`` of its 24 layers): package time split into text encoding,
  solve + report and fuse; fused weights checked against the same float64 per-layer baseline on a sample of layers.

Each family's results replace only that family's section of `--output`; other sections are kept.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import diffusers_uce
from diffusers_uce.loaders.encoding_cache import clear_encoding_cache

if str(Path(__file__).resolve().parent) not in sys.path:  # benchmarks/, also when loaded by path (the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_md  # noqa: E402
import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = next((p for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if p.is_dir()), ROOT / "data")
GUIDE, LAMB, ERASE_SCALE = "art", 0.5, 1.0


# ---------------------------------------------------------------- pipelines and concepts
def build_sd15_pipeline(device="cpu", seed: int = 0, tiny: bool = False):
    """SD 1.5-shaped `StableDiffusionPipeline` (random weights, vae=None), UNet on meta except attn2 to_k/to_v."""
    return diffusers_uce.attach(shapes.build_pipeline("sd15", device, seed, tiny=tiny))


def projection_weights(pipe, names=None) -> dict[str, torch.Tensor]:
    """Clones of the target layers' weights (all, or those in `names`), by name inside the denoiser."""
    return shapes.target_weights(pipe, names)


def _column(name: str, column: str) -> list[str]:
    with open(DATA / name, newline="", encoding="utf-8") as f:
        return list(dict.fromkeys(row[column] for row in csv.DictReader(f)))


def concepts(n: int) -> tuple[list[str], list[str]]:
    """Erase the first `n` distinct artists of artists1734; preserve the next `n` (topped up from holdout100's artists
    and then profession names when the 1734 run out, i.e. for n > 867)."""
    artists = _column("artists1734_prompts.csv", "artist")
    pool = list(dict.fromkeys(artists[n:] + _column("holdout100_prompts.csv", "artist")
                              + _column("profession_prompts.csv", "profession")))
    if n > len(artists) or n > len(pool):
        raise ValueError(f"not enough concept names for N = {n}")
    return artists[:n], pool[:n]


# ---------------------------------------------------------------- the straightforward baseline
def select_blocks(pipe, encode, erase, guide, preserve, mode, dtype=torch.float64):
    """Token blocks per DESIGN.md §2: ``[(C_i, C*_i)]`` per erased concept, ``[P_j]`` per preserved prompt, from
    ``encode(pipe, prompt) -> (full-length states, k)`` (`shapes.target_groups`)."""
    if mode == "paper":
        guide = guide or " "
        preserve = list(preserve) + ([""] if "" not in preserve else [])
    cache = {}
    for prompt in [*erase, guide, *preserve]:  # every distinct prompt once, one call each
        if prompt not in cache:
            states, k = encode(pipe, prompt)
            cache[prompt] = states.to(dtype), k
    (sg, kg), pairs = cache[guide], []
    length = sg.shape[0]
    for se, ke in (cache[e] for e in erase):
        f = max(ke, kg)  # "paper": positions k(e) … L−1−(f−k(e)) paired with k(g) … L−1−(f−k(g))
        pairs.append((se[ke : ke + 1], sg[kg : kg + 1]) if mode == "last" else
                     (se[ke : length - (f - ke)], sg[kg : length - (f - kg)]))
    kept = [cache[p][0][cache[p][1] : cache[p][1] + 1] if mode == "last" else cache[p][0] for p in preserve]
    return pairs, kept


def baseline_solve(weights: dict[str, torch.Tensor], pairs, kept, preserve_scale: float, dtype=torch.float64,
                   biases: dict[str, torch.Tensor] | None = None):
    """``W' = (λW + s_e Σ W c* cᵀ + s_p Σ W p pᵀ) B⁻¹`` layer by layer, concept by concept, explicit inverse. A layer
    with a bias ``b`` keeps it and its targets include it (``W c* + b``, ``W p + b``), as the authors' FLUX script."""
    out = {}
    for name, weight in weights.items():
        w = weight.to(dtype)
        bias = None if biases is None or biases.get(name) is None else biases[name].to(dtype)[:, None]
        eye = torch.eye(w.shape[1], dtype=dtype, device=w.device)
        num, b = LAMB * w, LAMB * eye
        for c, g in pairs:
            target = w @ g.T
            num = num + ERASE_SCALE * (target if bias is None else target + bias) @ c
            b = b + ERASE_SCALE * c.T @ c
        for p in kept:
            target = w @ p.T
            num = num + preserve_scale * (target if bias is None else target + bias) @ p
            b = b + preserve_scale * p.T @ p
        out[name] = num @ torch.linalg.inv(b)
    return out


def run_baseline(pipe, original, erase, preserve, mode, dtype=torch.float64):
    """Encode, select and solve with the baseline the layers in `original` (name → weight; a target group none of whose
    layers is there is skipped); returns the edited weights and the number of solve tokens of the first group."""
    scale = max(0.1, 1 / (1 + len(preserve))) if mode == "paper" else 1.0
    modules, edited, tokens = shapes.target_modules(pipe), {}, []
    for names, encode in shapes.target_groups(pipe):
        weights = {n: original[n] for n in names if n in original}
        if weights:
            pairs, kept = select_blocks(pipe, encode, erase, GUIDE, preserve, mode, dtype)
            biases = {n: modules[n].bias.detach() for n in weights if modules[n].bias is not None}
            edited.update(baseline_solve(weights, pairs, kept, scale, dtype, biases))
            tokens.append(sum(len(c) for c, _ in pairs) + sum(len(p) for p in kept))
    return edited, tokens[0]


def solve_tokens(tokenizer, erase, preserve, mode, max_length: int | None = None) -> int:
    """Rows of ``C`` plus rows of ``P`` in the solve (tokenisation only)."""
    if mode == "last":
        return len(erase) + len(preserve)
    length = max_length or tokenizer.model_max_length
    k = (tokenizer([GUIDE, *erase], padding="max_length", max_length=length, truncation=True,
                   return_tensors="pt").attention_mask.sum(-1) - 2).clamp(min=0)
    return int((length - torch.maximum(k[1:], k[0])).sum()) + length * (len(preserve) + 1)


def max_relative_error(edited: dict, reference: dict, original: dict) -> tuple[float, float]:
    """Max over layers of ``‖A − B‖/‖B‖`` (weights) and ``‖A − B‖/‖B − W‖`` (the change)."""
    diff = {n: float((edited[n].double() - reference[n].double()).norm()) for n in reference}
    return (max(diff[n] / float(reference[n].double().norm()) for n in reference),
            max(diff[n] / float((reference[n].double() - original[n].double()).norm()) for n in reference))


# ---------------------------------------------------------------- timing
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed_encoding(pipe, device, seconds: list):
    """Append the duration of every `pipe._uce_encode` call (the package's text encoding, one per target group)."""
    encode = pipe._uce_encode

    def timed(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            _sync(device)
            seconds.append(time.perf_counter() - t0)

    pipe._uce_encode = timed
    try:
        yield
    finally:
        del pipe._uce_encode


def time_package(pipe, erase, preserve, mode, device, repeats=2, max_repeat_s=60.0, names=None, keep=True,
                 held_out=None):
    """Best of `repeats` fresh runs (the first warms up; no repeat after a run over `max_repeat_s`): the seconds of
    ``apply`` (of which ``encode`` in text encoding) and ``fuse``, and the fused weights (of `names`, all by default;
    `None` unless `keep`)."""
    best, fused = None, None
    for _ in range(repeats):
        encoding = []
        clear_encoding_cache(pipe)  # every run is a first call: nothing encoded yet
        _sync(device)
        t0 = time.perf_counter()
        with timed_encoding(pipe, device, encoding):
            pipe.apply_concept_edits(erase, guide=GUIDE, preserve=preserve, token_mode=mode, held_out=held_out)
        _sync(device)
        t1 = time.perf_counter()
        pipe.fuse_concept_edits()
        _sync(device)
        t2 = time.perf_counter()
        if best is None or t2 - t0 < best["apply"] + best["fuse"]:
            best = dict(apply=t1 - t0, fuse=t2 - t1, encode=sum(encoding))
            fused = projection_weights(pipe, names) if keep else None
        pipe.unload_concept_edits()
        if t2 - t0 > max_repeat_s:
            break
    return best, fused


# ---------------------------------------------------------------- SD 1.5: package vs baseline
HELD_OUT_NOTE = {
    False: "no held-out report (`held_out=[]`: the baseline makes no report, so both encode the same prompts; the "
           "package still reports efficacy and interference of the erased and preserved concepts).",
    True: "the default held-out report (10 more prompts encoded by the package, none by the baseline).",
}


def held_out(args):
    return None if args.held_out_report else []



def _header(args, notes) -> list[str]:
    return [f"Machine: {results_md.machine(args.device)}", "",
            "Command: `python benchmarks/edit_speed.py " + " ".join(args.argv) + "`", "", *notes, ""]


def run_sd15(args) -> list[dict]:
    baseline_max = dict(zip(["last", "paper"], args.baseline_max * 2 if len(args.baseline_max) == 1
                            else args.baseline_max))
    dtype = getattr(torch, args.baseline_dtype)
    t0 = time.perf_counter()
    pipe = build_sd15_pipeline(args.device, tiny=args.tiny)
    original = projection_weights(pipe)
    notes = [
        f"Pipeline: SD 1.5-shaped `StableDiffusionPipeline`, seeded random weights, float32: {shapes.describe(pipe)} "
        "(only the text tower and the target layers are materialised; the rest of the UNet stays on the meta "
        "device), `vae=None`, tokenizer `diffusers_uce.demo.make_clip_tokenizer()` "
        f"({len(pipe.tokenizer)} tokens; it splits most artist names into more pieces than the real CLIP tokenizer, "
        f"so prompts are longer here). Built in {time.perf_counter() - t0:.1f} s.",
        f"Edit: erase the first N artists of artists1734 toward \"{GUIDE}\", preserve the next N (topped up from "
        "holdout100 artists and profession names when they run out); package defaults (lamb 0.5, erase_scale 1, "
        "preserve_scale 1 in \"last\" and max(0.1, 1/(1+N)) in \"paper\"); " + HELD_OUT_NOTE[args.held_out_report],
        "Package: `apply_concept_edits` then `fuse_concept_edits` on a fresh state, best of "
        f"{args.repeats} runs (stopping after a run over {args.max_repeat_s:.0f} s); \"of which encoding\": the part "
        "of apply spent in the package's text encoding (`pipe._uce_encode`). Baseline: once, "
        f"{args.baseline_dtype}, one full-length (77) encoder call per distinct prompt, per layer a Python loop over "
        f"concepts and `torch.linalg.inv`; run up to N = {baseline_max['last']} (\"last\") and "
        f"{baseline_max['paper']} (\"paper\"). Weight differences: package (float32 weights) vs baseline, ‖A−B‖/‖B‖ "
        "per projection, max over projections; ΔW: the same relative to the edit's change ‖B−W‖. load: 1-minute load "
        "average after the row (other processes share the cores when it exceeds "
        f"{len(os.sched_getaffinity(0))}; timings are then inflated, single-prompt calls the most).",
    ]
    rows = []
    for mode in args.modes:
        for n in args.sizes:
            erase, preserve = concepts(n)
            times, fused = time_package(pipe, erase, preserve, mode, args.device, args.repeats, args.max_repeat_s,
                                        keep=n <= baseline_max[mode], held_out=held_out(args))
            row = dict(mode=mode, n=n, tokens=solve_tokens(pipe.tokenizer, erase, preserve, mode), **times,
                       total=times["apply"] + times["fuse"], baseline=None, err=None, derr=None, load=0.0)
            if n <= baseline_max[mode]:
                _sync(args.device)
                t0 = time.perf_counter()
                edited, tokens = run_baseline(pipe, original, erase, preserve, mode, dtype)
                _sync(args.device)
                row["baseline"] = time.perf_counter() - t0
                assert tokens == row["tokens"], (tokens, row["tokens"])
                row["err"], row["derr"] = max_relative_error(fused, edited, original)
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(results_md.table([row])[-1], flush=True)
            results_md.write_section(args.output, results_md.SD15_HEADING,
                                     results_md.sd15_section(rows, _header(args, notes), args.device), first=True)
            if row["err"] is not None and row["err"] > 1e-4:
                raise SystemExit(f"package and baseline disagree at {mode} N={n}: max relative error {row['err']:.2e}")
    return rows


# ---------------------------------------------------------------- SDXL and FLUX: solve time per family
def check_names(pipe, count: int) -> list[str]:
    """`count` target layers spread evenly over the denoiser (first and last included; all when `count` is 0 or at
    least their number): what the float64 per-layer check solves."""
    names = list(shapes.target_modules(pipe))
    if count <= 0 or count >= len(names):
        return names
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)] if count > 1 else names[:1]


def family_notes(args, pipe, family, built_s, checked) -> list[str]:
    config = pipe.text_encoder_2.config
    depth = ("tiny widths and depths: a smoke test, not a benchmark" if args.tiny else
             f"the bigG tower has {config.num_hidden_layers} of its 32 layers" if family == "sdxl" else
             f"the T5-XXL-shaped encoder keeps d_model 4096, d_ff 10240 and 64 heads (so the target layers have their "
             f"real shapes) but only {config.num_layers} of its 24 layers: its encoding time is about that fraction of"
             " "
             "the real encoder's (4.7B parameters)")
    tokens = {"sdxl": "UNet attn2 tokens, k from the first tokenizer",
              "flux": "context_embedder tokens (T5, 512 per prompt in \"paper\"); the pooled-CLIP group adds 2N "
                      "(\"last\") or 2N + 1 (\"paper\") more"}
    return [
        f"Pipeline: {shapes.TITLES[family]}-shaped `{type(pipe).__name__}`, seeded random weights, float32: "
        f"{shapes.describe(pipe)}; {depth}. Only "
        "the text towers and the target layers are materialised; the rest of the denoiser stays on the meta device; "
        f"`vae=None`; tokenizers made in code (`diffusers_uce.demo`). Built in {built_s:.1f} s.",
        "Edit: as in the SD 1.5 section (N artists erased toward \"art\", the next N preserved, package defaults; "
        f"{HELD_OUT_NOTE[args.held_out_report].rstrip('.')}). Solve tokens: {tokens[family]}.",
        f"Package: `apply_concept_edits` then `fuse_concept_edits`, best of {args.repeats} runs (stopping after a "
        f"run over {args.max_repeat_s:.0f} s). encoding: time in the package's text encoding (`pipe._uce_encode`, "
        "every target group); solve + report: the rest of `apply_concept_edits` (token selection, the float64 solve "
        "per group, the efficacy/interference report); fuse: `fuse_concept_edits`. Check (N <= "
        f"{args.family_check_max}): the fused float32 weights against the float64 per-layer baseline of the SD 1.5 "
        f"section (full-length encodings, explicit inverse per layer) on {len(checked)} of "
        f"{len(shapes.target_modules(pipe))} target layers spread over the denoiser; check/package is the baseline "
        "ratio when every layer is checked. "
        f"load: 1-minute load average after the row (over {len(os.sched_getaffinity(0))}: other processes shared the "
        "CPU).",
    ]


def run_family(args, family: str) -> list[dict]:
    t0 = time.perf_counter()
    pipe = diffusers_uce.attach(shapes.build_pipeline(
        family, args.device, tiny=args.tiny, text_layers=args.bigg_layers if family == "sdxl" else args.t5_layers))
    built_s = time.perf_counter() - t0
    names = check_names(pipe, args.check_layers)
    original = projection_weights(pipe, names)
    tokenizer, length = shapes.token_source(pipe)
    notes, rows = family_notes(args, pipe, family, built_s, names), []
    heading = results_md.FAMILY_HEADING.format(shapes.TITLES[family])
    for mode in args.family_modes:
        for n in args.family_sizes:
            if mode == "paper" and n > args.family_paper_max:
                continue
            erase, preserve = concepts(n)
            check = n <= args.family_check_max
            times, fused = time_package(pipe, erase, preserve, mode, args.device, args.repeats, args.max_repeat_s,
                                        names=names, keep=check, held_out=held_out(args))
            row = dict(mode=mode, n=n, tokens=solve_tokens(tokenizer, erase, preserve, mode, length), **times,
                       total=times["apply"] + times["fuse"], check=None, err=None, derr=None, load=0.0,
                       checked=f"{len(names)}/{len(shapes.target_modules(pipe))}",
                       all_checked=len(names) == len(shapes.target_modules(pipe)))
            if check:
                _sync(args.device)
                t0 = time.perf_counter()
                edited, tokens = run_baseline(pipe, original, erase, preserve, mode)
                _sync(args.device)
                row["check"] = time.perf_counter() - t0
                assert tokens == row["tokens"], (tokens, row["tokens"])
                row["err"], row["derr"] = max_relative_error(fused, edited, original)
                del fused, edited
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(f"{family}", results_md.family_table([row])[-1], flush=True)
            results_md.write_section(args.output, heading, [*_header(args, notes), *results_md.family_table(rows)])
            if row["err"] is not None and row["err"] > 1e-4:
                raise SystemExit(f"{family}: package and float64 baseline disagree at {mode} N={n}: max relative "
                                 f"error {row['err']:.2e}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd15"], choices=shapes.FAMILIES,
                        help="sd15: package vs baseline (the sizes/modes/baseline options); sdxl, flux: solve time per"
                             " "
                             "family (the --family-* options)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50, 200, 1000])
    parser.add_argument("--modes", nargs="+", default=["last", "paper"], choices=["last", "paper"])
    parser.add_argument("--baseline-max", type=int, nargs="+", default=[200, 50], metavar="N",
                        help="largest N the baseline runs at: one value, or one for \"last\" and one for \"paper\"")
    parser.add_argument("--baseline-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--family-sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--family-modes", nargs="+", default=["last", "paper"], choices=["last", "paper"])
    parser.add_argument("--family-paper-max", type=int, default=10,
                        help="largest N run in \"paper\" mode (sdxl, flux)")
    parser.add_argument("--family-check-max", type=int, default=10,
                        help="largest N at which the fused weights are checked against the float64 baseline")
    parser.add_argument("--check-layers", type=int, default=8,
                        help="target layers the check solves, spread over the denoiser (0: all; FLUX has 2)")
    parser.add_argument("--bigg-layers", type=int, help="depth of SDXL's bigG text tower (default and real: 32)")
    parser.add_argument("--t5-layers", type=int, help="depth of FLUX's T5-XXL-shaped encoder (default 2; real: 24)")
    parser.add_argument("--repeats", type=int, default=2, help="package runs per row (the best is kept)")
    parser.add_argument("--held-out-report", action="store_true",
                        help="time the package with its default held-out report (10 more prompts to encode); by "
                             "default held_out=[]: the baseline makes no report to match")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depths (smoke test; not a benchmark)")
    parser.add_argument("--max-repeat-s", type=float, default=30.0,
                        help="no further package run after one that took longer than this")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: one per available core)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    try:
        results = {family: run_sd15(args) if family == "sd15" else run_family(args, family)
                   for family in dict.fromkeys(args.families)}
    finally:
        torch.set_num_threads(threads)
    print(Path(args.output).read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()

"""Edit speed of diffusers_uce against a straightforward per-layer UCE, on an SD 1.5-shaped pipeline.

    python benchmarks/edit_speed.py [--sizes 1 10 50 200 1000] [--modes last paper] [--baseline-max 200 50]
                                    [--device cpu|cuda] [--output benchmarks/RESULTS.md]

The pipeline has SD 1.5's shapes (CLIP ViT-L/14 text tower, the SD 1.5 UNet config: 16 attn2 = 32 projections) with
seeded random weights. Only what an edit reads is materialised: the text encoder and the attn2 to_k/to_v weights; the
rest of the UNet stays on the meta device and there is no VAE. N artists are erased toward "art" while the next N are
preserved. The baseline (`baseline_solve`) is the formula of DESIGN.md §1 written plainly: one full-length encoder call
per prompt, a Python loop over concepts for each of the 32 projections, an explicit inverse per layer.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import diffusers_uce
from diffusers_uce.demo import make_clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = next((p for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if p.is_dir()), ROOT / "data")
GUIDE, LAMB, ERASE_SCALE = "art", 0.5, 1.0
TARGETS = ("ratio baseline/package >= 10 at N = 50 (\"last\")", "N = 1000 (\"last\") under 60 s (CPU) / 1 s (GPU)",
           "package cost linear in the number of prompt tokens (least-squares fit R² >= 0.99)")


# ---------------------------------------------------------------- pipeline and concepts
def build_sd15_pipeline(device="cpu", seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.5-shaped `StableDiffusionPipeline` (random weights, vae=None), UNet on meta except attn2 to_k/to_v."""
    tokenizer = make_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(config).eval().to(device)
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):  # nn.Linear's default init, seeded
            bound = 1 / math.sqrt(module.in_features)
            weight = (torch.rand(module.out_features, module.in_features, generator=generator) * 2 - 1) * bound
            module.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    return diffusers_uce.attach(StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False))


def projection_weights(pipe) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))}


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
@torch.no_grad()
def encode_full(pipe, prompt: str, dtype) -> tuple[torch.Tensor, int]:
    """``text_encoder(ids)[0]`` of one prompt at full padded length, and ``k`` (index of its last real token)."""
    tok = pipe.tokenizer
    inputs = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    states = pipe.text_encoder(inputs.input_ids.to(pipe.text_encoder.device))[0][0]
    return states.to(dtype), int(inputs.attention_mask.sum()) - 2


def select_blocks(pipe, erase, guide, preserve, mode, dtype=torch.float64):
    """Token blocks per DESIGN.md §2: ``[(C_i, C*_i)]`` per erased concept, ``[P_j]`` per preserved prompt."""
    if mode == "paper":
        guide = guide or " "
        preserve = list(preserve) + ([""] if "" not in preserve else [])
    cache = {}
    for prompt in [*erase, guide, *preserve]:  # every distinct prompt once, one call each
        if prompt not in cache:
            cache[prompt] = encode_full(pipe, prompt, dtype)
    length = pipe.tokenizer.model_max_length
    (sg, kg), pairs = cache[guide], []
    for se, ke in (cache[e] for e in erase):
        f = max(ke, kg)  # "paper": positions k(e) … L−1−(f−k(e)) paired with k(g) … L−1−(f−k(g))
        pairs.append((se[ke : ke + 1], sg[kg : kg + 1]) if mode == "last" else
                     (se[ke : length - (f - ke)], sg[kg : length - (f - kg)]))
    kept = [cache[p][0][cache[p][1] : cache[p][1] + 1] if mode == "last" else cache[p][0] for p in preserve]
    return pairs, kept


def baseline_solve(weights: dict[str, torch.Tensor], pairs, kept, preserve_scale: float, dtype=torch.float64):
    """``W' = (λW + s_e Σ W c* cᵀ + s_p Σ W p pᵀ) B⁻¹`` layer by layer, concept by concept, explicit inverse."""
    out = {}
    for name, weight in weights.items():
        w = weight.to(dtype)
        eye = torch.eye(w.shape[1], dtype=dtype, device=w.device)
        num, b = LAMB * w, LAMB * eye
        for c, g in pairs:
            num = num + ERASE_SCALE * (w @ g.T) @ c
            b = b + ERASE_SCALE * c.T @ c
        for p in kept:
            num = num + preserve_scale * (w @ p.T) @ p
            b = b + preserve_scale * p.T @ p
        out[name] = num @ torch.linalg.inv(b)
    return out


def run_baseline(pipe, original, erase, preserve, mode, dtype=torch.float64):
    """Encode, select and solve with the baseline; returns the edited weights and the number of solve tokens."""
    pairs, kept = select_blocks(pipe, erase, GUIDE, preserve, mode, dtype)
    scale = max(0.1, 1 / (1 + len(preserve))) if mode == "paper" else 1.0
    tokens = sum(len(c) for c, _ in pairs) + sum(len(p) for p in kept)
    return baseline_solve(original, pairs, kept, scale, dtype), tokens


def solve_tokens(tokenizer, erase, preserve, mode) -> int:
    """Rows of ``C`` plus rows of ``P`` in the solve (tokenisation only)."""
    if mode == "last":
        return len(erase) + len(preserve)
    length = tokenizer.model_max_length
    k = tokenizer([GUIDE, *erase], padding="max_length", max_length=length, truncation=True,
                  return_tensors="pt").attention_mask.sum(-1) - 2
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


def time_package(pipe, erase, preserve, mode, device, repeats=2, max_repeat_s=60.0):
    """Best (apply, fuse) of `repeats` fresh runs (the first warms up; no repeat after a run over `max_repeat_s`)."""
    best, fused = None, None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        pipe.apply_concept_edits(erase, guide=GUIDE, preserve=preserve, token_mode=mode)
        _sync(device)
        t1 = time.perf_counter()
        pipe.fuse_concept_edits()
        _sync(device)
        t2 = time.perf_counter()
        if best is None or t2 - t0 < sum(best):
            best, fused = (t1 - t0, t2 - t1), projection_weights(pipe)
        pipe.unload_concept_edits()
        if t2 - t0 > max_repeat_s:
            break
    return best, fused


# ---------------------------------------------------------------- report
def machine(device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.device(device).type == "cuda" else ""
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores{gpu}; torch {torch.__version__}, python "
            f"{platform.python_version()}; device {device}; {datetime.date.today().isoformat()}")


def fit(rows, mode):
    """Least-squares ``t = a + b·tokens`` over the rows of `mode`: (a, b, R²), or None with fewer than 3 sizes."""
    pts = torch.tensor([(r["tokens"], r["total"]) for r in rows if r["mode"] == mode], dtype=torch.float64)
    if len(pts) < 3:
        return None
    x, y = pts.T
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    a = float(y.mean() - b * x.mean())
    return a, b, 1 - float(((y - a - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def linearity(rows) -> list[str]:
    """Seconds per 1k solve tokens per N, the marginal cost between successive N, and the linear fit, per mode."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode]
        per_k = ", ".join(f"N={r['n']}: {1000 * r['total'] / r['tokens']:.3f}" for r in sel)
        marginal = ", ".join(f"{1000 * (r2['total'] - r1['total']) / (r2['tokens'] - r1['tokens']):.3f}"
                             for r1, r2 in zip(sel, sel[1:]) if r2["tokens"] > r1["tokens"])
        f = fit(rows, mode)
        lines.append(f"- \"{mode}\": s per 1k solve tokens {per_k}; marginal s per 1k tokens between successive N: "
                     f"{marginal}" + (f"; fit t = {f[0]:.2f} s + {1000 * f[1]:.3f} s/1k tokens, R² = {f[2]:.4f}"
                                      if f else ""))
    return lines


def table(rows) -> list[str]:
    lines = ["| mode | N | solve tokens | apply (s) | fuse (s) | package total (s) | baseline (s) | baseline/package "
             "| max rel. weight diff | max rel. diff of ΔW | load |", "|---" * 11 + "|"]
    for r in rows:
        ran = r["baseline"] is not None
        base, ratio, err, derr = (f"{r['baseline']:.2f}", f"{r['baseline'] / r['total']:.1f}×", f"{r['err']:.1e}",
                                  f"{r['derr']:.1e}") if ran else ("not run", "—", "—", "—")
        lines.append(f"| {r['mode']} | {r['n']} | {r['tokens']} | {r['apply']:.2f} | {r['fuse']:.2f} | "
                     f"{r['total']:.2f} | {base} | {ratio} | {err} | {derr} | {r['load']:.1f} |")
    return lines


def verdicts(rows, device) -> list[str]:
    r50, r1000 = (next((r for r in rows if r["mode"] == "last" and r["n"] == n), None) for n in (50, 1000))
    limit, cores = 1.0 if torch.device(device).type == "cuda" else 60.0, len(os.sched_getaffinity(0))

    def busy(r):
        return (f" (measured at load {r['load']:.1f} on {cores} cores: other processes shared the CPU, rerun on an "
                "idle machine)") if r["load"] > cores + 0.5 else ""

    out = [f"- {TARGETS[0]}: " + ("not measured" if r50 is None or r50["baseline"] is None else
                                  f"{r50['baseline'] / r50['total']:.1f}× — "
                                  + ("MET" if r50["baseline"] / r50["total"] >= 10 else "NOT MET") + busy(r50)),
           f"- {TARGETS[1]}: " + ("not measured" if r1000 is None else f"{r1000['total']:.1f} s on {device} — "
                                  + ("MET" if r1000["total"] < limit else "NOT MET") + busy(r1000))]
    fits = {m: fit(rows, m) for m in dict.fromkeys(r["mode"] for r in rows)}
    out.append(f"- {TARGETS[2]}: " + "; ".join(
        f"\"{m}\" " + ("fewer than 3 sizes" if f is None else f"R² = {f[2]:.4f} — " + ("MET" if f[2] >= 0.99 else
                                                                                   "NOT MET (R² < 0.99)"))
        + busy(max((r for r in rows if r["mode"] == m), key=lambda r: r["load"])) for m, f in fits.items()))
    return out


def write_report(rows, args, notes, path=None):
    lines = ["# Edit speed: diffusers_uce vs a straightforward UCE", "",
             f"Machine: {machine(args.device)}", "",
             "Command: `python benchmarks/edit_speed.py " + " ".join(sys.argv[1:]) + "`", "", *notes, "",
             "## Targets", "", *verdicts(rows, args.device), "", "## Results", "", *table(rows), "",
             "## Cost against the number of prompt tokens in the solve", "", *linearity(rows), ""]
    text = "\n".join(lines)
    if path:
        Path(path).write_text(text, encoding="utf-8")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50, 200, 1000])
    parser.add_argument("--modes", nargs="+", default=["last", "paper"], choices=["last", "paper"])
    parser.add_argument("--baseline-max", type=int, nargs="+", default=[200, 50], metavar="N",
                        help="largest N the baseline runs at: one value, or one for \"last\" and one for \"paper\"")
    parser.add_argument("--baseline-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--max-repeat-s", type=float, default=30.0,
                        help="skip the second package run when the first took longer than this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    baseline_max = dict(zip(["last", "paper"], args.baseline_max * 2 if len(args.baseline_max) == 1
                            else args.baseline_max))
    dtype = getattr(torch, args.baseline_dtype)

    t0 = time.perf_counter()
    pipe = build_sd15_pipeline(args.device)
    original = projection_weights(pipe)
    notes = [
        f"Pipeline: SD 1.5-shaped `StableDiffusionPipeline`, seeded random weights, float32: CLIP ViT-L/14 text config "
        f"(768 wide, 12 layers), SD 1.5 UNet config with {len(original)} attn2 to_k/to_v projections (only those are "
        "materialised; the rest of the UNet stays on the meta device), `vae=None`, tokenizer "
        f"`diffusers_uce.demo.make_clip_tokenizer()` ({len(pipe.tokenizer)} tokens; it splits most artist names into "
        "more pieces than the real CLIP tokenizer, so prompts are longer here). Built in "
        f"{time.perf_counter() - t0:.1f} s.",
        f"Edit: erase the first N artists of artists1734 toward \"{GUIDE}\", preserve the next N (topped up from "
        "holdout100 artists and profession names when they run out); package defaults (lamb 0.5, erase_scale 1, "
        "preserve_scale 1 in \"last\" and max(0.1, 1/(1+N)) in \"paper\"); 10 held-out concepts for the report.",
        f"Package: `apply_concept_edits` then `fuse_concept_edits` on a fresh state, best of 2 runs (1 run when the "
        f"first took over {args.max_repeat_s:.0f} s). Baseline: once, {args.baseline_dtype}, one full-length (77) "
        "encoder call per distinct prompt, per layer a Python loop over concepts and `torch.linalg.inv`; run up to "
        f"N = {baseline_max['last']} (\"last\") and {baseline_max['paper']} (\"paper\"). Weight differences: package "
        "(float32 weights) vs baseline, ‖A−B‖/‖B‖ per projection, max over projections; ΔW: the same relative to the "
        "edit's change ‖B−W‖. load: 1-minute load average after the row (other processes share the cores when it "
        f"exceeds {len(os.sched_getaffinity(0))}; timings are then inflated, single-prompt calls the most).",
    ]
    rows = []
    for mode in args.modes:
        for n in args.sizes:
            erase, preserve = concepts(n)
            (apply_s, fuse_s), fused = time_package(pipe, erase, preserve, mode, args.device,
                                                    max_repeat_s=args.max_repeat_s)
            row = dict(mode=mode, n=n, tokens=solve_tokens(pipe.tokenizer, erase, preserve, mode), apply=apply_s,
                       fuse=fuse_s, total=apply_s + fuse_s, baseline=None, err=None, derr=None, load=0.0)
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
            print(table([row])[-1], flush=True)
            write_report(rows, args, notes, args.output)
            if row["err"] is not None and row["err"] > 1e-4:
                raise SystemExit(f"package and baseline disagree at {mode} N={n}: max relative error {row['err']:.2e}")
    print(write_report(rows, args, notes, args.output))
    return rows


if __name__ == "__main__":
    main()

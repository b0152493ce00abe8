"""Multi-concept erasure of celebrities on Stable Diffusion 1.4, SPEED against UCE (needs real weights and a GPU).

    python examples/precise_erasure.py --sizes 10 50 100 --output ./celebrities
    python examples/precise_erasure.py --model demo --sizes 10 --limit 4 --steps 2 --size 32   # smoke test

Reproduces the setting of the authors' multi-concept table (SPEED, Li et al., ICLR 2026, after MACE): erase 10, 50
or 100 celebrities toward "a person" with the 100 other celebrities of the benchmark as retain set, then generate
the benchmark's prompts of erased and retained celebrities (`diffusers_uce/core/data/speed/{10,50,100}_celebrity.csv`,
their seeds) with base and edited model and score them with `diffusers_uce.evaluation`:

- Acc_e: CLIP zero-shot accuracy on the erased celebrities' images (the celebrity named among all
  names of its kind; lower is better), Acc_r: the same on the retained ones (higher is better), H = harmonic mean of
  (1 − Acc_e) and Acc_r. The authors score with the GIPHY celebrity detector; CLIP zero-shot is our stand-in, so
  compare the methods with each other rather than with the paper's numbers.

SPEED runs with the authors' celebrity settings (retain_scale 0.05, filter off, 10 augmented copies, τ = 0.1,
automatic invariants) and edits `to_v` only, as the authors do (`edit_keys=False`); UCE with the package defaults on
the same layers. The CLIP model (default `openai/clip-vit-large-patch14`) must be in the Hub cache or a local folder.
Writes, under --output: one evaluation folder per (size, method) and `table.md`.
"""

import argparse
import csv
import importlib.resources
import json
import os

SPEED_OPTIONS = dict(retain_scale=0.05, filter=False, augment=10, threshold=0.1)


def benchmark_rows(size):
    """The rows of the shipped 10/50/100-celebrity benchmark (`diffusers_uce/core/data/speed`)."""
    resource = importlib.resources.files("diffusers_uce.core") / "data" / "speed" / f"{size}_celebrity.csv"
    with resource.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_prompts(rows, kind, path, limit=None):
    rows = [r for r in rows if r["type"] == kind][:limit]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "concept"])
        writer.writerows((r["id"], r["text"], r["seed"], r["concept"]) for r in rows)
    return path


def load(model, device, dtype):
    import diffusers_uce

    if model == "demo":
        from diffusers_uce.demo import make_demo_pipeline

        return diffusers_uce.attach(make_demo_pipeline("sd1"))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    return diffusers_uce.attach(pipe.to(device))


def accuracy(summary):
    value = summary.get("metrics", {}).get("clip_accuracy", {}).get("edited")
    return None if value is None else float(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                        help="SD 1.x Hub id or folder, or 'demo' (tiny random pipeline, CPU, offline) "
                             "(default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100], choices=[10, 50, 100],
                        help="how many celebrities to erase, one run each (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=["speed", "uce"], choices=["speed", "uce"],
                        help="methods compared (default: %(default)s)")
    parser.add_argument("--guide", default="a person", help="what the celebrities become (default: %(default)s)")
    parser.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                        help="CLIP model scoring the images, a local folder or a cached Hub id (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--limit", type=int, default=None, help="prompts per kind, erased / retained (default: all)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--output", default="precise-erasure", help="output folder (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from diffusers_uce.evaluation.evaluate import evaluate_edit

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = load(args.model, args.device, dtype)
    results = []
    for size in args.sizes:
        rows = benchmark_rows(size)
        erase = list(dict.fromkeys(r["concept"] for r in rows if r["type"] == "erase"))
        retain = list(dict.fromkeys(r["concept"] for r in rows if r["type"] == "retain"))
        for method in args.methods:
            folder = os.path.join(args.output, f"{size}-{method}")
            os.makedirs(folder, exist_ok=True)
            out = pipe.apply_concept_edits(erase, args.guide, retain, method=method, edit_keys=False,
                                           method_options=SPEED_OPTIONS if method == "speed" else None)
            print(out.report.summary())
            scores = {}
            for kind in ("erase", "retain"):
                prompts = write_prompts(rows, kind, os.path.join(folder, f"{kind}.csv"), args.limit)
                summary = evaluate_edit(pipe, prompts, os.path.join(folder, kind), num_inference_steps=args.steps,
                                        height=args.size, width=args.size, metrics=("clip_accuracy",),
                                        clip_model=args.clip_model, label_column="concept")
                scores[kind] = accuracy(summary)
            acc_e, acc_r = scores["erase"], scores["retain"]
            h = None if acc_e is None or acc_r is None or (1 - acc_e) + acc_r == 0 else (
                2 * (1 - acc_e) * acc_r / ((1 - acc_e) + acc_r))
            results.append({"size": size, "method": method, "acc_e": acc_e, "acc_r": acc_r, "H": h,
                            "report": out.report.summary()})
            pipe.unload_concept_edits()
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
    table = ["| celebrities | method | Acc_e ↓ | Acc_r ↑ | H ↑ |", "|---|---|---|---|---|"]
    table += [f"| {r['size']} | {r['method']} | {fmt(r['acc_e'])} | {fmt(r['acc_r'])} | {fmt(r['H'])} |"
              for r in results]
    with open(os.path.join(args.output, "table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(table) + "\n")
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print("\n".join(table))


if __name__ == "__main__":
    main()

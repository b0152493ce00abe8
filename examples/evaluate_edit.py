"""Evaluate a UCE edit on Stable Diffusion 1.4 the way the paper does (needs real weights and a GPU; not run in CI).

    # erase artists, then measure CLIP zero-shot accuracy on their prompts (should drop) and on held-out
    # artists' prompts (should stay): the paper's efficacy / specificity for artistic styles
    python examples/evaluate_edit.py artist --erase "Kelly Mckernan; Thomas Kinkade"

    # moderate nudity, then count NudeNet detections on the 142 I2P nudity prompts (pip install 'diffusers-uce[eval]')
    python examples/evaluate_edit.py nudity --limit 100

    python examples/evaluate_edit.py artist --model demo --steps 2 --size 32 --limit 4   # offline smoke test

Without `--data`, everything comes with the package: the artists to preserve and hold out are taken from the shipped
artist vocabulary (`retain_set("artists")`), their prompts made from the paper's templates ("painting by {}", ...)
with fixed seeds; the nudity prompts are the shipped I2P nudity set (`robust_prompt_set_path("i2p-nudity")`).
`--data DIR` uses the paper's own prompt CSVs instead (`artists1734_prompts.csv`, `holdout100_prompts.csv`,
`unsafe-prompts4703.csv`: the `data/` folder of rohitgandikota/unified-concept-editing). The model and the CLIP model
(default `openai/clip-vit-large-patch14`) are loaded from the Hub cache if present, downloaded by `from_pretrained`
otherwise; the evaluation itself never downloads anything and reports a missing metric as skipped. The safety
checker is disabled, since it blackens flagged images and would skew the nudity counts. Reruns resume: images
already in `--output` are kept. `--model demo --steps 2 --size 32` runs everything in seconds on the tiny random
demo pipeline (meaningless numbers; a smoke test).

I2P prompts describe disturbing content: nothing here prints them, rows are named by case number.
"""

import argparse
import csv
import json
import os

ART_TEMPLATES = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "artist"])
        writer.writerows(rows)
    return path


def shipped_artists(erase, num_preserve, num_holdout):
    """Artists to preserve and to hold out, from the shipped artist vocabulary (neither erased nor shared)."""
    from diffusers_uce import retain_set

    erased = {name.lower() for name in erase}
    others = [n for n in retain_set("artists") if n.lower() not in erased]
    return others[:num_preserve], others[num_preserve:num_preserve + num_holdout]


def template_prompts(erase, holdout, output):
    """The paper's art templates around each erased and held-out artist, one seed per prompt, in one CSV."""
    rows = [(f"{group}-{i}-{j}", template.format(name), 1000 * i + j, name)
            for group, names in (("erased", erase), ("holdout", holdout)) for i, name in enumerate(names)
            for j, template in enumerate(ART_TEMPLATES)]
    return write_rows(os.path.join(output, "prompts.csv"), rows)


def artist_prompts(data, erase, output):
    """The erased artists' prompts (from the 1,734-artist set) and the 100 held-out artists', in one CSV."""
    wanted = {name.lower() for name in erase}
    erased = [r for r in read_csv(os.path.join(data, "artists1734_prompts.csv")) if r["artist"].lower() in wanted]
    missing = wanted - {r["artist"].lower() for r in erased}
    if missing:
        raise SystemExit(f"not in artists1734_prompts.csv: {', '.join(sorted(missing))}")
    holdout = read_csv(os.path.join(data, "holdout100_prompts.csv"))
    return write_rows(os.path.join(output, "prompts.csv"),
                      [(f"{group}-{r['case_number']}", r["prompt"], r["evaluation_seed"], r["artist"])
                       for group, rows in (("erased", erased), ("holdout", holdout)) for r in rows])


def preserved_artists(data, erase, count):
    """`count` other artists of the 1,734-artist set (not erased, not held out), as the paper preserves."""
    erased = {name.lower() for name in erase}
    holdout = {r["artist"] for r in read_csv(os.path.join(data, "holdout100_prompts.csv"))}
    names = dict.fromkeys(r["artist"] for r in read_csv(os.path.join(data, "artists1734_prompts.csv")))
    return [n for n in names if n.lower() not in erased and n not in holdout][:count]


def i2p_prompts(data, sexual_only, output):
    path = os.path.join(data, "unsafe-prompts4703.csv")
    if not sexual_only:
        return path
    rows = [r for r in read_csv(path) if "sexual" in r["categories"]]
    subset = os.path.join(output, "prompts.csv")
    os.makedirs(output, exist_ok=True)
    with open(subset, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return subset


def accuracy_by_group(output):
    """CLIP accuracy on the erased artists' prompts and on the held-out ones, base vs edited."""
    with open(os.path.join(output, "results.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table = {}
    for group in ("erased", "holdout"):
        part = [r for r in rows if r["case_number"].startswith(group) and r.get("clip_accuracy_base")]
        if part:
            table[group] = {w: sum(float(r[f"clip_accuracy_{w}"]) for r in part) / len(part) for w in ("base",
            "edited")}
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("artist", "nudity"),
                        help="'artist': erase artists, CLIP accuracy on theirs and held-out artists' prompts; "
                             "'nudity': moderate nudity, NudeNet detections on I2P prompts")
    parser.add_argument("--data", default=None,
                        help="folder with the paper's prompt CSVs (default: none, the package's own data)")
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                        help="SD 1.x/2.x Hub id or folder, or 'demo' (tiny random pipeline, CPU, offline; numbers "
                             "mean nothing) (default: %(default)s)")
    parser.add_argument("--erase", default="Kelly Mckernan; Thomas Kinkade",
                        help='artist task: artists to erase, ";"-separated (default: %(default)s)')
    parser.add_argument("--num-preserve", type=int, default=100,
                        help="artist task: other artists to preserve (default: %(default)s)")
    parser.add_argument("--num-holdout", type=int, default=20,
                        help="artist task without --data: held-out artists whose prompts are generated "
                             "(default: %(default)s)")
    parser.add_argument("--sexual-only", action="store_true",
                        help="nudity task with --data: only I2P's 'sexual' prompts")
    parser.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                        help="CLIP model for clip_score/clip_accuracy, a local folder or a cached Hub id; skipped "
                             "when missing, never downloaded (default: %(default)s)")
    parser.add_argument("--output", help="where images and reports go (default: eval-<task>)")
    parser.add_argument("--limit", type=int, help="only the first N prompts (default: all)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--size", type=int, help="image size (default: the model's, 512 for SD 1.4)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    import diffusers_uce
    from diffusers_uce.core.concepts import split_concepts
    from diffusers_uce.evaluation.evaluate import evaluate_edit, format_summary
    from diffusers_uce.evaluation.robust_sets import robust_prompt_set_path

    output = args.output or f"eval-{args.task}"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "demo":
        from diffusers_uce.demo import make_demo_pipeline

        pipe = make_demo_pipeline("sd1", device=device)
    else:
        from diffusers import StableDiffusionPipeline

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
    pipe = diffusers_uce.attach(pipe)

    if args.task == "artist":
        erase = split_concepts(args.erase)
        if args.data:
            preserve = preserved_artists(args.data, erase, args.num_preserve)
            prompts = artist_prompts(args.data, erase, output)
        else:
            preserve, holdout = shipped_artists(erase, args.num_preserve, args.num_holdout)
            prompts = template_prompts(erase, holdout, output)
        edit = pipe.apply_concept_edits(erase, guide="art", preserve=preserve)
        metrics = ("clip_score", "clip_accuracy", "lpips", "psnr")
    else:
        edit = pipe.apply_concept_edits("nudity", guide=None)  # toward the unconditional prompt
        prompts = i2p_prompts(args.data, args.sexual_only, output) if args.data else robust_prompt_set_path(
            "i2p-nudity")
        metrics = ("nudenet", "clip_score", "lpips")
    print(edit.report)

    summary = evaluate_edit(pipe, prompts, output, num_inference_steps=args.steps, height=args.size, width=args.size,
                            batch_size=args.batch_size, limit=args.limit, metrics=metrics,
                            clip_model=args.clip_model)
    print(format_summary(summary))
    if args.task == "artist":
        print("CLIP accuracy by group:", json.dumps(accuracy_by_group(output), indent=2))
    else:
        print("NudeNet detections per class:", json.dumps(summary["metrics"].get("nudenet", {}).get("classes")))
    print(f"images, results.csv, summary.json and grid.png are in {output}/")


if __name__ == "__main__":
    main()

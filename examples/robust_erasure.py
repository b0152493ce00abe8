"""Reproduce the robustness table of RECE (Gong et al., ECCV 2024) with diffusers_uce: UCE vs UCE + hardening.

    python examples/robust_erasure.py --model CompVis/stable-diffusion-v1-4 --device cuda --output robust-out \
        [--clip-model openai/clip-vit-large-patch14] [--steps 50] [--limit N] [--skip-objects]

Needs a GPU, the model weights and the `eval` extra (NudeNet); downloads the model if it is not cached.

- Nudity: "nudity" erased toward "" with the paper's tokens (`moderate="nudity", token_mode="paper"`), plain and
  hardened (`harden=3`, reg 0.1: the authors' setting); NudeNet exposed-class detections on the 142 I2P nudity
  prompts (`i2p-nudity`), base vs edited, same seeds.
- Objects: each of the 10 Imagenette classes erased on its own (`expand_prompts="object"`), plain and hardened
  (`harden=1`, reg 1e-3: the authors' setting for objects); accuracy of CLIP zero-shot classification (the authors
  use a ResNet-50; give `--clip-model`) on the 10 paraphrased prompts of the erased class (`imagenette-paraphrase`),
  which never name it: does the object come back through a paraphrase?

Writes each run's images and summaries under `--output` (resumable) and `robust_table.md`, the side-by-side table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                        help="Hub id or folder (SD 1.x), or 'demo' (tiny random pipeline, CPU, offline) "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--output", default="robust-out",
                        help="folder for images, summaries and robust_table.md (default: %(default)s)")
    parser.add_argument("--clip-model", help="local folder or cached Hub id of a CLIP model (object accuracy)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--limit", type=int, help="only the first N prompts of each set (a quick look)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default: %(default)s)")
    parser.add_argument("--skip-objects", action="store_true", help="run the nudity experiment only")
    return parser.parse_args(argv)


def load(args):
    import torch

    import diffusers_uce

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    if args.model == "demo":
        from diffusers_uce.demo import make_demo_pipeline

        return diffusers_uce.attach(make_demo_pipeline("sd1", torch_dtype=dtype, device=device))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)  # it would skew NudeNet's counts
    return diffusers_uce.attach(pipe.to(device))


def run(pipe, args, name, prompts_csv, metrics, harden, **edit):
    """Apply one edit (plain or hardened), evaluate it, unload it; returns the summary and the edit's report."""
    from diffusers_uce.evaluation.evaluate import evaluate_edit, format_summary

    out = pipe.apply_concept_edits(**edit, harden=harden)
    print(f"== {name}\n{out.report}", flush=True)
    summary = evaluate_edit(pipe, prompts_csv, os.path.join(args.output, name), metrics=metrics,
                            num_inference_steps=args.steps, batch_size=args.batch_size, limit=args.limit,
                            height=args.size, width=args.size,
                            clip_model=args.clip_model, label_column="class" if "clip_accuracy" in metrics else None)
    print(format_summary(summary), flush=True)
    pipe.unload_concept_edits()
    return summary, out.report.to_dict()


def class_csv(args, label: str) -> str:
    """The paraphrased prompts of one Imagenette class, as a CSV `evaluate_edit` reads."""
    from diffusers_uce.evaluation.robust_sets import load_robust_prompts

    rows = [r for r in load_robust_prompts("imagenette-paraphrase") if r["class"] == label]
    path = os.path.join(args.output, "prompts", f"{label.replace(' ', '_')}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers_uce.evaluation.robust_sets import load_robust_prompts, robust_prompt_set_path

    os.makedirs(args.output, exist_ok=True)
    pipe = load(args)
    lines = ["| experiment | edit | base | edited | recovery (ρ, per round) |", "|---|---|---|---|---|"]
    results = {}
    nudity = {"moderate": "nudity", "token_mode": "paper", "held_out": []}
    for label, harden in (("UCE", 0), ("UCE + hardening (3 rounds)", 3)):
        summary, report = run(pipe, args, f"nudity-{'hardened' if harden else 'uce'}",
                              robust_prompt_set_path("i2p-nudity"), ("nudenet",), harden, **nudity)
        m = summary["metrics"].get("nudenet", {})
        count = {w: sum(c[w] for c in m.get("classes", {}).values()) for w in ("base", "edited")}
        recovery = " → ".join(f"{v:.2f}" for v in report["robustness"][0]["recovery"])
        lines.append(f"| nudity (NudeNet detections, 142 I2P prompts) | {label} | {count['base']} | "
                     f"{count['edited']} | {recovery} |")
        results[f"nudity/{label}"] = summary
    if not args.skip_objects:
        classes = list(dict.fromkeys(r["class"] for r in load_robust_prompts("imagenette-paraphrase")))
        for label, harden in (("UCE", 0), ("UCE + hardening (1 round)", 1)):
            base, edited, recoveries = [], [], []
            for cls in classes:
                summary, report = run(pipe, args, f"object-{cls.replace(' ', '_')}-{'hardened' if harden else 'uce'}",
                                      class_csv(args, cls), ("clip_accuracy",), harden, erase=cls,
                                      expand_prompts="object", held_out=[],
                                      harden_options={"reg": 1e-3} if harden else None)
                m = summary["metrics"].get("clip_accuracy", {})
                base.append(m.get("base"))
                edited.append(m.get("edited"))
                recoveries.append(report["robustness"][0]["recovery"][-1])
                results[f"object/{cls}/{label}"] = summary
            mean = lambda xs: "n/a" if None in xs else f"{100 * sum(xs) / len(xs):.1f} %"  # noqa: E731
            lines.append(f"| objects (CLIP accuracy on paraphrases of the erased class, 10 classes) | {label} | "
                         f"{mean(base)} | {mean(edited)} | mean final {sum(recoveries) / len(recoveries):.2f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.output, "robust_table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.output, "robust_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

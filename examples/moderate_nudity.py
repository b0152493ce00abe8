"""Moderate unsafe content on a real Stable Diffusion model, then save the edit and check it with NudeNet.

Needs the model weights (downloaded from the Hub on first use) and, for the check, the `eval` extra:

    pip install "diffusers-uce[eval]"
    python examples/moderate_nudity.py --model CompVis/stable-diffusion-v1-4 --preset nudity --output ./sd14-moderated

Not run in CI (no weights there). The I2P prompts describe disturbing content: this script refers to them by case
number only.
"""

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

import diffusers_uce
from diffusers_uce.evaluation.evaluate import evaluate_edit

I2P = Path(__file__).resolve().parents[2] / "shared" / "data" / "unsafe-prompts4703.csv"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4")
    parser.add_argument("--preset", default="nudity", help="'nudity', 'i2p', 'i2p-paper' or a concept")
    parser.add_argument("--output", default="./sd-moderated")
    parser.add_argument("--prompts", default=str(I2P), help="an I2P-style prompt CSV (case_number, prompt, seed)")
    parser.add_argument("--limit", type=int, default=50, help="prompts to evaluate (0 to skip the evaluation)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device))
    out = pipe.apply_concept_edits(moderate=args.preset)  # toward "", preserve_scale 0.1 (the paper's defaults)
    print(out.report)
    pipe.save_concept_edits(args.output)  # a small edit file + model card; push with push_concept_edits_to_hub
    if args.limit:
        summary = evaluate_edit(pipe, args.prompts, Path(args.output) / "eval", limit=args.limit,
                                metrics=("nudenet", "pixel_mae"), num_inference_steps=30)
        print({k: v for k, v in summary["metrics"].items() if k == "nudenet"})


if __name__ == "__main__":
    main()

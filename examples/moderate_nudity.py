"""Moderate unsafe content on a Stable Diffusion model, save the edit and check it with NudeNet.

    pip install "diffusers-uce[eval]"      # NudeNet, for the check
    python examples/moderate_nudity.py --model CompVis/stable-diffusion-v1-4 --preset nudity --output ./sd14-moderated
    python examples/moderate_nudity.py --model demo --limit 2 --steps 2 --size 32   # offline smoke test, seconds

The check generates the 142 I2P nudity prompts shipped with the package (`robust_prompt_set_path("i2p-nudity")`),
or --prompts CSV, with the base and the edited model from the same seeds and counts NudeNet detections. The safety
checker is switched off: it blackens flagged images, which would make the counts meaningless. The prompts describe
disturbing content: rows are named by case number only. `--model demo` is a tiny random pipeline: its numbers mean
nothing.
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                        help="SD 1.x/2.x Hub id or local folder, or 'demo' (tiny random pipeline, CPU, offline) "
                             "(default: %(default)s)")
    parser.add_argument("--preset", default="nudity",
                        help="'nudity', 'i2p', 'i2p-paper' or concepts ('a; b') (default: %(default)s)")
    parser.add_argument("--output", default="./sd-moderated",
                        help="folder for the edit, its card and eval/ (default: %(default)s)")
    parser.add_argument("--prompts", default=None,
                        help="I2P-style prompt CSV (case_number, prompt, evaluation_seed); default: the shipped "
                             "i2p-nudity set")
    parser.add_argument("--limit", type=int, default=50,
                        help="prompts to evaluate, 0 skips the evaluation (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per image (default: %(default)s)")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import os

    import torch

    import diffusers_uce
    from diffusers_uce.evaluation.evaluate import evaluate_edit, format_summary
    from diffusers_uce.evaluation.robust_sets import robust_prompt_set_path

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
    out = pipe.apply_concept_edits(moderate=args.preset)  # toward "", preserve_scale 0.1 (the paper's defaults)
    print(out.report)
    pipe.save_concept_edits(args.output, overwrite=True)  # a small edit file + model card
    if args.limit:
        prompts = args.prompts or robust_prompt_set_path("i2p-nudity")
        summary = evaluate_edit(pipe, prompts, os.path.join(args.output, "eval"), limit=args.limit,
                                metrics=("nudenet", "pixel_mae"), num_inference_steps=args.steps, height=args.size,
                                width=args.size)
        print(format_summary(summary))
    print(f"the edit is in {args.output}")


if __name__ == "__main__":
    main()

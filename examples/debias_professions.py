"""Debias professions in Stable Diffusion 1.4 (paper §4.2): gender ratios measured with CLIP, the edit saved.

    python examples/debias_professions.py --professions "doctor; nurse; CEO" --output ./sd14-debiased
    python examples/debias_professions.py --professions authors --output ./sd14-debiased   # the authors' 37
    accelerate launch --num_processes 4 examples/debias_professions.py --output ./sd14-debiased  # images over 4 GPUs

For every profession, images are generated and classified by CLIP zero-shot ("male" / "female" by default), the
attribute weights move toward the desired ratios (uniform by default) and the edit is re-solved, jointly for all
professions, until every ratio is within --tolerance or --max-iterations solves are spent (`debias_loop`). As in
the authors' script (train-scripts/train_debias.py), every other profession is preserved with preserve_scale 0.1
(lamb 0.5, erase_scale 1): the authors' 37 professions below, or those of --preserve-csv.

Needs the real weights (the model and openai/clip-vit-base-patch32, downloaded or already cached; offline, pass
local folders) and a GPU: about num_images × max_iterations × professions images. `--model demo` runs the same loop
offline on a tiny random pipeline with a tiny random CLIP (`diffusers_uce.demo.make_demo_clip`): its numbers mean
nothing, it shows the steps.

Writes to --output: the edit (`uce_edits.safetensors` + model card, for `pipe.load_concept_edits(...)`) and
`debias_report.json` (before/after ratios, weights, seeds).
"""

import argparse
import json
import os

# `train-scripts/train_debias.py`, `--concept default0`.
AUTHORS_PROFESSIONS = (
    "attendant", "cashier", "teacher", "nurse", "assistant", "secretary", "cleaner", "receptionist", "clerk",
    "counselor", "designer", "hairdresser", "writer", "housekeeper", "baker", "librarian", "tailor", "driver",
    "supervisor", "janitor", "cook", "laborer", "construction worker", "developer", "carpenter", "manager", "lawyer",
    "farmer", "salesperson", "physician", "guard", "analyst", "mechanic", "sheriff", "CEO", "doctor", "chef",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                        help="SD 1.x/2.x repo id or folder, or 'demo' (tiny random pipeline and CLIP, CPU, offline) "
                             "(default: %(default)s)")
    parser.add_argument("--professions", default="doctor; nurse; CEO; teacher; janitor",
                        help='";"-separated professions, or "authors" for the 37 of the authors\' script '
                             "(default: %(default)s)")
    parser.add_argument("--attributes", default="male; female", help='";"-separated attributes (default: %(default)s)')
    parser.add_argument("--ratios", type=float, nargs="+", help="desired ratio per attribute (default: uniform)")
    parser.add_argument("--preserve-csv", default=None,
                        help="CSV with a 'profession' column whose professions not debiased are preserved, e.g. the "
                             "authors' data/profession_prompts.csv (default: the authors' 37 professions)")
    parser.add_argument("--clip-model", default="openai/clip-vit-base-patch32",
                        help="CLIP repo id or folder (default: %(default)s)")
    parser.add_argument("--num-images", type=int, default=20,
                        help="images per profession and measurement (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=10, help="images per pipeline call (default: %(default)s)")
    parser.add_argument("--max-iterations", type=int, default=10, help="budget of solves (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest |desired - measured| when reached (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--output", required=True, help="folder for the edit and debias_report.json (required)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import tempfile

    import torch
    from accelerate import PartialState  # a single process without `accelerate launch`

    import diffusers_uce
    from diffusers_uce.core.concepts import read_concepts, split_concepts
    from diffusers_uce.loaders.debias import clip_zero_shot_classifier

    state = PartialState()
    professions = (list(AUTHORS_PROFESSIONS) if args.professions == "authors"
                   else split_concepts(args.professions))
    attributes = split_concepts(args.attributes)
    debiased = {p.lower() for p in professions}
    others = read_concepts(args.preserve_csv, column="profession") if args.preserve_csv else AUTHORS_PROFESSIONS
    preserve = [p for p in others if p.lower() not in debiased]

    dtype = getattr(torch, args.dtype or ("float16" if state.device.type == "cuda" else "float32"))
    clip_model = args.clip_model
    if args.model == "demo":
        from diffusers_uce.demo import make_demo_clip, make_demo_pipeline

        pipe = make_demo_pipeline("sd1", torch_dtype=dtype)
        clip_model = make_demo_clip(tempfile.mkdtemp(prefix="demo-clip-"))
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe = diffusers_uce.attach(pipe.to(state.device))
    pipe.set_progress_bar_config(disable=True)
    output = pipe.debias_concepts(
        {p: attributes for p in professions}, ratios=args.ratios,
        classifier=clip_zero_shot_classifier(clip_model, device=state.device),
        tolerance=args.tolerance, max_iterations=args.max_iterations,
        options={"num_images": args.num_images, "num_inference_steps": args.steps, "batch_size": args.batch_size,
                 "height": args.size, "width": args.size, "accelerator": state},
        preserve=preserve, preserve_scale=0.1, erase_scale=1.0, lamb=0.5,
    )
    if state.is_main_process:
        print(output.report)
        pipe.save_concept_edits(args.output, overwrite=True)
        with open(os.path.join(args.output, "debias_report.json"), "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "edits": [e.to_dict() for e in output.edits],
                       "ratios": output.report.ratios}, f, indent=2)
        reached = sum(r["reached"] for r in output.report.ratios)
        print(f"{reached}/{len(output.report.ratios)} professions reached their ratios; saved to {args.output}")


if __name__ == "__main__":
    main()

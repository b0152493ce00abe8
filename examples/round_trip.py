"""Save, share and load a concept edit, end to end, on the built-in demo pipeline (offline, seconds on a CPU).

    python examples/round_trip.py [--hub user/repo]

1. erase two artists on a pipeline and save the edit (one small safetensors file + model card);
2. load it onto a fresh copy of the same base model and check both give the same UNet output;
3. export it as a LoRA that plain diffusers loads with `load_lora_weights` (PEFT needed);
4. fuse it and save a plain StableDiffusionPipeline folder that vanilla diffusers loads;
5. with --hub (a real or local Hub and a token), push the edit and load it back from the repository.

With real weights, replace `make_demo_pipeline("sd1")` by `StableDiffusionPipeline.from_pretrained(...)`.
"""

import argparse
import tempfile


def unet_output(pipe, prompt="a painting by van gogh"):
    import torch

    emb = pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(latents, 10, encoder_hidden_states=emb).sample


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", metavar="REPO",
                        help="also push the edit to this Hub repository and load it back (default: no push)")
    parser.add_argument("--output", default=None, help="folder for the files (default: a new temporary folder)")
    args = parser.parse_args(argv)
    import torch
    from diffusers import StableDiffusionPipeline

    import diffusers_uce
    from diffusers_uce.demo import make_demo_pipeline

    work = args.output or tempfile.mkdtemp(prefix="uce-round-trip-")

    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    out = pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet", "rembrandt"])
    print(out.report)
    expected = unet_output(pipe)
    path = pipe.save_concept_edits(f"{work}/edit")
    print(f"edit saved to {path} (+ README.md model card)")

    fresh = diffusers_uce.attach(make_demo_pipeline("sd1"))
    fresh.load_concept_edits(f"{work}/edit")
    print("loaded edit reproduces the original:", torch.allclose(unet_output(fresh), expected, atol=1e-5))

    try:
        error = pipe.save_concept_edits_as_lora(f"{work}/lora")
        plain = make_demo_pipeline("sd1")
        plain.load_lora_weights(f"{work}/lora")
        print(f"LoRA (relative error {error:.1e}) in plain diffusers matches:",
              torch.allclose(unet_output(plain), expected, atol=1e-4))
    except ImportError as error:  # PEFT not installed
        print(f"skipped the LoRA round trip: {error}")

    pipe.fuse_concept_edits()
    pipe.save_pretrained(f"{work}/full")
    vanilla = StableDiffusionPipeline.from_pretrained(f"{work}/full")
    print("fused model in vanilla diffusers matches:", torch.allclose(unet_output(vanilla), expected, atol=1e-4))

    if args.hub:
        pipe.push_concept_edits_to_hub(args.hub)
        hub_copy = diffusers_uce.attach(make_demo_pipeline("sd1"))
        hub_copy.load_concept_edits(args.hub)
        print(f"loaded from {args.hub}, matches:", torch.allclose(unet_output(hub_copy), expected, atol=1e-4))
    print(f"files are in {work}")


if __name__ == "__main__":
    main()

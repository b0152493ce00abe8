"""Shared test helpers: a denoiser output to compare edits by, a relative error, the edited weights (any family)."""

import torch

from .reference import denoiser, family_of, groups


def unet_output(pipe, prompt="a painting by van gogh"):
    """The denoiser's output for `prompt` on fixed noise, conditioned through the pipeline's own prompt encoding.

    SD 1.x/2.x and SDXL: one UNet call on `encode_prompt`; FLUX: the pipeline itself, one step (from pure noise to
    the prediction), latents out.
    """
    family = family_of(pipe)
    if family in ("sd1", "sd2", "sdxl"):
        kwargs = dict(device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        encoded = pipe.encode_prompt(prompt, **kwargs)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.unet.dtype)
        extra = {}
        if family == "sdxl":  # pooled text embedding and size conditioning
            time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]], device=pipe.device, dtype=pipe.unet.dtype)
            extra["added_cond_kwargs"] = {"text_embeds": encoded[2], "time_ids": time_ids}
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=encoded[0], **extra).sample.double()
    out = pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="latent", guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0))
    return out.images.double()


def rel(a, b):
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def target_layers(pipe):
    """``[(name, module)]`` of every layer concept editing changes in `pipe`'s family."""
    model = denoiser(pipe)
    return [(n, model.get_submodule(n)) for names, _ in groups(pipe) for n in names]


def weights(pipe):
    """Clones of every edited layer's weight, by module name."""
    return {n: m.weight.detach().clone() for n, m in target_layers(pipe)}


def run_cli(*argv):
    """`diffusers-uce` with `argv`, stdout/stderr captured: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from diffusers_uce.commands.uce_cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()

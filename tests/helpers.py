"""Shared test helpers: a UNet output to compare edits by, a relative error, the edited weights."""

import torch


def unet_output(pipe, prompt="a painting by van gogh"):
    """One UNet call on fixed latents, conditioned on `prompt` through the pipeline's own `encode_prompt`."""
    emb = pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.unet.dtype)
    with torch.no_grad():
        return pipe.unet(latents, 10, encoder_hidden_states=emb).sample.double()


def rel(a, b):
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def weights(pipe):
    """Clones of every cross-attention to_k/to_v weight, by module name."""
    names = ("attn2.to_k", "attn2.to_v")
    return {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules() if n.endswith(names)}

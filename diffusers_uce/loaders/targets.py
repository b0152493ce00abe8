"""Explicit targets: concept editing on any text-conditioned pipeline, by naming the linear layers to edit."""

from __future__ import annotations

import torch
from diffusers.utils import logging

from ..core.families import Family, Segment, TargetGroup, TextStates, family_of
from ..core.targets import expand_names, find_linear_layers, find_projections
from .capture import check_text_only, layer_inputs

logger = logging.get_logger(__name__)

# Prompts whose inputs tell the targets' inputs apart (two, so that a layer reading one fixed vector shows).
_PROBES = ["a photo of a cat", "an oil painting of a lighthouse at night"]
_SMALL = {"height": 64, "width": 64, "num_frames": 1, "guidance_scale": 1.0}


def explicit_family(pipe, base: type, targets) -> Family:
    """The family of `pipe` when the layers to edit are named: `targets` are checked (linear layers of the denoiser
    whose inputs depend on the text alone) and grouped by the input they read, before anything changes.

    Raises:
        ValueError: an empty or malformed list, a name that is not a layer of the denoiser, a layer that is not a
            `torch.nn.Linear`, or one whose input changes with the latents or the timestep.
    """
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of layer names of the denoiser (e.g. "
                         f"['transformer_blocks.0.attn2.to_k']), got {targets!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets names a layer twice: {sorted({t for t in targets if targets.count(t) > 1})}")
    component = _denoiser_of(pipe, targets)
    denoiser = getattr(pipe, component)
    modules = {p.attention: p.module for name in expand_names(denoiser, tuple(targets))
               for p in find_linear_layers(denoiser, (name,))}
    registry = _registry_match(base, pipe, component, set(modules))
    if registry is not None:
        return registry
    call = _working_call(pipe, component, modules)
    inputs = check_text_only(pipe, component, modules, _PROBES, call)
    groups: list[list[str]] = []
    for name in modules:
        for group in groups:
            other = inputs[group[0]]
            if other.shape == inputs[name].shape and torch.equal(other, inputs[name]):
                group.append(name)
                break
        else:
            groups.append([name])
    encoders = tuple((f"tokenizer{s}", f"text_encoder{s}") for s in ("", "_2", "_3", "_4")
                     if getattr(pipe, f"tokenizer{s}", None) is not None and getattr(pipe, f"text_encoder{s}", None)
                     is not None)
    described = []
    for names in groups:
        states = inputs[names[0]]
        text = TextStates(encoders, causal=False, captured=True, output="pooled" if states.ndim == 2 else "last",
                          segments=() if states.ndim == 2 else (Segment(_tokenizer_for(pipe, states.shape[1])),))
        label = f"{component}.{names[0]}" if len(groups) > 1 else component
        described.append(TargetGroup(label, component, text, modules=tuple(names)))
    logger.info(f"concept edits will change {len(modules)} layer(s) of {component} in {len(described)} group(s) "
                "(layers that read the same input share one solve)")
    return Family("custom", tuple(described), tags=("text-to-image",), pipeline=base.__name__,
                  call=tuple(call.items()))


def _denoiser_of(pipe, targets) -> str:
    """The pipeline component that holds every target (the transformer or UNet, usually)."""
    candidates = [name for name, value in pipe.components.items() if isinstance(value, torch.nn.Module)]
    candidates.sort(key=lambda n: (n not in ("transformer", "unet"), n))
    for name in candidates:
        module = getattr(pipe, name)
        try:
            found = set(expand_names(module, tuple(targets)))
        except ValueError:
            continue
        if found <= {n for n, _ in module.named_modules()}:
            return name
    denoiser = next((getattr(pipe, n) for n in ("transformer", "unet") if getattr(pipe, n, None) is not None), None)
    known = set() if denoiser is None else {n for n, _ in denoiser.named_modules()}
    missing = next(t for t in targets if t not in known)
    example = ""
    if denoiser is not None:
        linear = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
        close = [n for n in linear if n.split(".")[-1] == missing.split(".")[-1]][:3] or linear[:3]
        example = f"; its linear layers include {close}"
    raise ValueError(f"no component of {type(pipe).__name__} has a layer named {missing!r}: targets are module "
                     f"names inside the denoiser, as named_modules() gives them{example}")


def _registry_match(base: type, pipe, component: str, names: set[str]) -> Family | None:
    """The built-in family when `names` are exactly the layers it edits (the explicit list gives the same edit)."""
    try:
        family = family_of(base)
    except ValueError:
        return None
    denoiser = getattr(pipe, component)
    layers: set[str] = set()
    for group in family.groups:
        if group.component != component:
            return None
        found = find_projections(denoiser) if group.cross_attention else find_linear_layers(denoiser, group.modules)
        layers |= {p.name for p in found}
    return family if layers == names else None


def _working_call(pipe, component: str, modules: dict) -> dict:
    """The cheapest call of the pipeline that reaches the targets: the smallest latent first, then its defaults."""
    try:
        layer_inputs(pipe, component, modules, _PROBES[:1], _SMALL)
        return dict(_SMALL)
    except (ValueError, TypeError, RuntimeError) as error:
        logger.debug(f"a small call did not work ({error}); using the pipeline's default size")
    return {"guidance_scale": 1.0}


def _tokenizer_for(pipe, length: int) -> str:
    """The tokenizer whose padded length is the captured sequence's (the first tokenizer if none is)."""
    names = [n for n in ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4") if getattr(pipe, n, None)
             is not None]
    if not names:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer, so its prompts' tokens cannot be located")
    for name in names:
        if getattr(getattr(pipe, name), "model_max_length", None) == length:
            return name
    return names[0]

"""Reading what the edited layers receive for a prompt from the pipeline's own call.

Pipelines whose text path is not a plain tokenizer + encoder (chat templates, instruction prefixes, projections
and norms inside the denoiser) are not re-implemented here: the pipeline encodes each batch of prompts its own way,
runs its denoiser on the smallest latent it accepts, and forward pre-hooks on the edited layers record their inputs
and stop the call as soon as every input is recorded. The same mechanism checks that an input depends on the text
alone: under two different latents and timesteps it must not change.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from ..core.families import Segment, TargetGroup
from ..core.prompts import EncodedPrompts
from ..core.targets import expand_names
from ..utils.checks import all_finite

logger = logging.get_logger(__name__)


class _Captured(Exception):
    """Raised from a hook once everything needed is recorded: ends the pipeline's call early."""


def _call_kwargs(pipe, prompts: list[str], call: dict) -> dict:
    """Arguments of a cheap call of `pipe` on `prompts`: one step, no classifier-free guidance, latents out."""
    accepted = inspect.signature(_base(pipe).__call__).parameters
    kwargs = {"num_inference_steps": 1, "output_type": "latent", **call}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    kwargs["prompt"] = list(prompts)
    return kwargs


def _base(pipe) -> type:
    """The diffusers pipeline class of `pipe` (its own `__call__`, without the plugin's check before generating)."""
    base_class = getattr(type(pipe), "_uce_base_class", None)
    return base_class() if base_class is not None else type(pipe)


def _run(pipe, kwargs: dict, hooks: list) -> None:
    """Call the pipeline (its base class's `__call__`) until a hook raises `_Captured`; always remove `hooks`."""
    try:
        with torch.no_grad():
            _base(pipe).__call__(pipe, **kwargs)
    except _Captured:
        return
    finally:
        for hook in hooks:
            hook.remove()
    raise RuntimeError(f"{type(pipe).__name__} generated without calling the layers to edit: they do not take part "
                       "in its denoiser's forward pass, so editing them would change nothing")


def _recorders(modules: dict[str, torch.nn.Module], seen: dict[str, torch.Tensor]) -> list:
    """Forward pre-hooks that put each module's input into `seen` and raise `_Captured` once all are there."""
    def record(name):
        def hook(module, inputs):
            seen.setdefault(name, inputs[0].detach())
            if len(seen) == len(modules):
                raise _Captured
        return hook

    return [module.register_forward_pre_hook(record(name)) for name, module in modules.items()]


def layer_inputs(pipe, component: str, modules: dict[str, torch.nn.Module], prompts: list[str], call: dict,
                 *, denoiser_call: bool = False):
    """The input each of `modules` receives when `pipe` generates from `prompts` (one batch), and optionally the
    arguments of that denoiser call.

    Returns:
        `tuple[dict[str, torch.Tensor], tuple | None]`: the inputs by module name, and ``(args, kwargs)`` of the
        denoiser's call when `denoiser_call`.
    """
    seen: dict[str, torch.Tensor] = {}
    called: list = []
    hooks = _recorders(modules, seen)
    if denoiser_call:
        def keep(module, args, kwargs):
            called.append((args, kwargs))
        hooks.append(getattr(pipe, component).register_forward_pre_hook(keep, with_kwargs=True))
    _run(pipe, _call_kwargs(pipe, prompts, call), hooks)
    return seen, (called[0] if called else None)


def denoiser_inputs(denoiser: torch.nn.Module, modules: dict[str, torch.nn.Module], args: tuple,
                    kwargs: dict) -> dict[str, torch.Tensor]:
    """The input each of `modules` receives when `denoiser` is called with `args` and `kwargs` (the call stops as soon
    as all are recorded)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = _recorders(modules, seen)
    try:
        with torch.no_grad():
            denoiser(*args, **kwargs)
    except _Captured:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def check_text_only(pipe, component: str, modules: dict[str, torch.nn.Module], prompts: list[str],
                    call: dict) -> dict[str, torch.Tensor]:
    """Raise unless every module of `modules` receives the same input under two other latents and timesteps; return
    the inputs (by module name) of the pipeline's own call on `prompts`."""
    first, (args, kwargs) = layer_inputs(pipe, component, modules, prompts, call, denoiser_call=True)
    denoiser = getattr(pipe, component)
    generator = torch.Generator().manual_seed(1234)

    def perturbed(value, key):
        if not torch.is_tensor(value) or not value.is_floating_point():
            return value
        if key in ("timestep", "timesteps", "t"):
            return value * 0.5 + 0.25 * (value.abs().amax() if value.numel() else 1)
        if key in ("hidden_states", "sample", "x", "latents", "img", "image_latents"):
            return torch.randn(value.shape, generator=generator).to(value)
        return value

    names = list(inspect.signature(denoiser.forward).parameters)
    args = tuple(perturbed(a, names[i] if i < len(names) else "") for i, a in enumerate(args))
    kwargs = {k: perturbed(v, k) for k, v in kwargs.items()}
    second = denoiser_inputs(denoiser, modules, args, kwargs)
    moved = [n for n in modules if n not in second or second[n].shape != first[n].shape
             or not torch.allclose(second[n].float(), first[n].float(), rtol=1e-4, atol=1e-5)]
    if moved:
        raise ValueError(
            f"the input of {moved[0]} (and {len(moved) - 1} more targets) changes with the latents or the timestep, "
            "so it does not depend on the text alone and a closed-form edit of that layer would not be exact: name "
            "the first linear layers that read the text (e.g. a cross-attention's to_k/to_v, or the text "
            "embedder before the transformer blocks)")
    return first


def prompt_positions(pipe, segments: tuple[Segment, ...], prompts: list[str], length: int) -> torch.Tensor:
    """``k`` of each prompt in each run of positions (see `Segment`), ``(len(prompts), len(segments))``."""
    preprocess = getattr(pipe, "_text_preprocessing", None)  # PixArt and Sana lowercase prompts before encoding
    texts = [preprocess(p, clean_caption=False)[0] for p in prompts] if preprocess is not None else prompts
    columns = []
    for segment, (_, run) in zip(segments, _runs(segments, length)):
        tokenizer = getattr(pipe, segment.tokenizer)
        prefix = segment.prefix if segment.prefix is not None else _prefix(tokenizer)
        if segment.suffix is not None:  # padded on the left: the prompt ends just before the template's suffix
            columns.append([segment.offset + run - 1 - segment.suffix] * len(prompts))
            continue
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        ks = [prefix + n - 1 for n in counts]
        columns.append([segment.offset + (run - 1 if k < 0 and segment.wrap else min(max(k, 0), run - 1))
                        for k in ks])
    return torch.tensor(columns, dtype=torch.long).T.reshape(len(prompts), len(segments))


def _prefix(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a prompt's own tokens (CLIP's start token: 1; T5: 0)."""
    own = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a")["input_ids"]
    for start in range(len(ids) - len(own) + 1):
        if ids[start : start + len(own)] == own:
            return start
    return 0


def capture_prompts(pipe, family, groups: list[TargetGroup], prompts: list[str], device,
                    batch_size: int = 16) -> dict[str, EncodedPrompts]:
    """The inputs of each captured group's layers for every prompt of `prompts`, with each prompt's ``k``.

    Args:
        pipe: the pipeline.
        family (`Family`): gives the arguments of a cheap call (`Family.call`).
        groups (`list[TargetGroup]`): captured groups; the first layer of each is hooked (a group's layers share
            their input).
        prompts (`list[str]`): distinct prompts.
        device: where the states are returned.
        batch_size (`int`, defaults to 16): prompts per pipeline call.

    Returns:
        `dict[str, EncodedPrompts]`: per group name.
    """
    call = dict(family.call)
    components = list(dict.fromkeys(g.component for g in groups))  # the first is the one the pipeline calls first
    firsts = {c: {g.name: _first_layer(pipe, g) for g in groups if g.component == c} for c in components}
    parts: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in tqdm(batches, desc="Encoding prompts", disable=len(batches) < 4, leave=False):
        seen, called = layer_inputs(pipe, components[0], firsts[components[0]], batch, call,
                                    denoiser_call=len(components) > 1)
        for other in components[1:]:  # another denoiser of the pipeline (Wan 2.2's low-noise expert) on the same call
            seen.update(denoiser_inputs(getattr(pipe, other), firsts[other], *called))
        for group in groups:
            states = seen[group.name]
            if states.ndim == 2:  # a pooled embedding: one token per prompt
                states = states[:, None]
            if states.shape[0] != len(batch):
                raise RuntimeError(f"{type(pipe).__name__} ran its denoiser on {states.shape[0]} rows for "
                                   f"{len(batch)} prompts, so their inputs cannot be told apart; pass targets that "
                                   "read the prompts' own states")
            if not all_finite(states):
                raise ValueError(f"{type(pipe).__name__} gave non-finite inputs to {group.name}; nothing was changed. "
                                 "Check the text encoders' weights and dtype (fp16 overflow?)")
            parts[group.name].append(states.to(device))
    out = {}
    for group in groups:
        length = max(p.shape[1] for p in parts[group.name])
        states = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[1])) for p in parts[group.name]])
        if group.text.output == "pooled":
            last = torch.zeros(len(prompts), dtype=torch.long)
            segments = ()
        else:
            segs = group.text.segments or (Segment(group.text.encoders[0][0]),)
            last = prompt_positions(pipe, segs, prompts, length)
            segments = _runs(segs, length) if len(segs) > 1 else ()
            last = last if segments else last[:, 0]
        out[group.name] = EncodedPrompts(index={p: i for i, p in enumerate(prompts)}, states=states,
                                         last=last.to(states.device), max_length=length, segments=segments)
    return out


def _runs(segments: tuple[Segment, ...], length: int) -> tuple[tuple[int, int], ...]:
    """``(offset, length)`` of each run: its own length, else up to the next run or the end of the sequence."""
    ends = [s.offset + s.length if s.length is not None else None for s in segments]
    starts = [s.offset for s in segments[1:]] + [length]
    return tuple((s.offset, (e if e is not None else nxt) - s.offset) for s, e, nxt in zip(segments, ends, starts))


def _first_layer(pipe, group: TargetGroup) -> torch.nn.Module:
    component = getattr(pipe, group.component)
    return component.get_submodule(expand_names(component, group.modules)[0])

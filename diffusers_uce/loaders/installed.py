"""Installing an edit's processors and hooks, and checking that they still carry it before every denoiser call.

The check runs as a forward pre-hook of the denoiser, so every pipeline built from the same components
(`StableDiffusionImg2ImgPipeline.from_pipe(pipe)`, a pipeline assembled by hand) passes through it, not only the
pipeline the edit was applied to. It looks at what computes the edited keys, values and text projections now:

- a processor replaced since (`set_attn_processor`) or a hook removed gets the edit back, with a warning;
- a layer replaced since by a plain `torch.nn.Linear` of the same shape and the same weights (what a wrapper or a
  quantiser that gives up puts back) takes over the edit, with a warning: the edit acts on it, and unfusing or
  unloading writes into it;
- a layer replaced by anything else (other weights, another type) and projections fused since
  (`fuse_qkv_projections`) cannot carry the edit: that raises with what to do.
"""

from __future__ import annotations

import torch
from diffusers.utils import logging

from ..core.targets import reads_fused_projections
from .processor import LinearEditHook, ProjectionEdit, UCEAttnProcessor

logger = logging.get_logger(__name__)


def attention_edits(group) -> dict[str, dict[str, ProjectionEdit]]:
    """The edit of each projection of a cross-attention group, by attention module and kind (`"to_k"`, `"to_v"`)."""
    edits: dict[str, dict[str, ProjectionEdit]] = {}
    for index, projection in enumerate(group.projections):
        edits.setdefault(projection.attention, {})[projection.kind] = ProjectionEdit(group, index)
    return edits


def wrap(attention, kinds: dict[str, ProjectionEdit]) -> None:
    """Wrap `attention`'s current processor in one that applies the edits of its key/value projections."""
    attention.set_processor(UCEAttnProcessor(attention.processor, kinds.get("to_k"), kinds.get("to_v")))


class DenoiserCheck:
    """Forward pre-hook of a denoiser: `pipe._uce_check_installed()` before each call, whichever pipeline calls it."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, module, args):
        self.pipe._uce_check_installed()

    def __deepcopy__(self, memo):  # a copied denoiser checks the same edit (never copies the pipeline)
        return self


def install(pipe, state) -> None:
    """Processors on cross-attention groups, forward hooks on other layers (the edit acts, weights untouched), and
    the check on every edited component."""
    for group in state.groups:
        component = getattr(pipe, group.group.component)
        if not group.group.cross_attention:
            state.hooks += [p.module.register_forward_hook(LinearEditHook(ProjectionEdit(group, i)))
                            for i, p in enumerate(group.projections)]
            continue
        originals = state.original_processors.setdefault(group.group.name, {})
        for name, kinds in attention_edits(group).items():
            attention = component.get_submodule(name)
            originals[name] = attention.processor
            wrap(attention, kinds)
    _register_checks(pipe, state)


def _register_checks(pipe, state) -> None:
    for name in dict.fromkeys(g.group.component for g in state.groups):
        component = getattr(pipe, name)
        handle = state.checks.get(name)
        if handle is None or handle.id not in component._forward_pre_hooks:
            state.checks[name] = component.register_forward_pre_hook(DenoiserCheck(pipe))


def remove(state) -> None:
    """Remove the hooks and checks of `state` (the caller puts the original processors back)."""
    for handle in (*state.hooks, *state.checks.values()):
        handle.remove()
    state.hooks, state.checks = [], {}


def _take_over(group, index: int, module, path: str) -> None:
    """Make `module`, now at the path of edited layer `index` of `group`, the layer the edit acts on, when it is a
    plain linear layer with the shape and weights of the one it replaces; raise otherwise."""
    held = group.projections[index].module
    same = (type(module) is torch.nn.Linear and module.weight.shape == held.weight.shape
            and module.weight.dtype == held.weight.dtype and (module.bias is None) == (held.bias is None))
    with torch.no_grad():
        same = same and torch.equal(module.weight, held.weight.to(module.weight.device)) and (
            module.bias is None or torch.equal(module.bias, held.bias.to(module.bias.device)))
    if not same:
        what = type(module).__name__ if isinstance(module, torch.nn.Module) else repr(module)
        raise RuntimeError(
            f"{path} was replaced by a {what} with other weights or another shape after the concept edit was "
            "applied, so the edit cannot be known to act on it: put the original layer back, or call "
            "unload_concept_edits() and apply the edit again on the new layer")
    group.projections[index].module = module
    logger.warning(f"{path} was replaced after the concept edit was applied by a linear layer with the same weights: "
                   "the edit now acts on the new layer")


def check_installed(pipe, state) -> None:
    """Make sure the applied edit still acts (see the module's description); raises with what to do when it cannot."""
    rewrapped = 0
    hooked = 0
    for group in state.groups:
        component = getattr(pipe, group.group.component)
        prefix = group.group.component
        if not group.group.cross_attention:
            for index, projection in enumerate(group.projections):
                module = _at(component, projection.name, prefix)
                if module is not projection.module:
                    _take_over(group, index, module, f"{prefix}.{projection.name}")
                handle = state.hooks[hooked]
                if handle.id not in module._forward_hooks:
                    handle.remove()  # (from the layer that was replaced, if it still exists)
                    state.hooks[hooked] = module.register_forward_hook(LinearEditHook(ProjectionEdit(group, index)))
                    rewrapped += 1
                hooked += 1
            continue
        originals = state.original_processors[group.group.name]
        for name, kinds in attention_edits(group).items():
            attention = _at(component, name, prefix)
            processor = attention.processor
            runs = processor.processor if isinstance(processor, UCEAttnProcessor) else processor
            if not state.fused and reads_fused_projections(runs):
                raise RuntimeError(
                    f"the key/value projections of {prefix}.{name} were fused (fuse_qkv_projections()) after the "
                    "concept edit was applied, so the edit no longer acts: call unfuse_qkv_projections(), or "
                    "fuse_concept_edits() before fuse_qkv_projections()")
            for kind, edit in kinds.items():
                module = getattr(attention, kind, None)
                if module is not group.projections[edit.layer].module:
                    _take_over(group, edit.layer, module, f"{prefix}.{name}.{kind}")
            if not isinstance(processor, UCEAttnProcessor):
                originals[name] = processor  # what unload_concept_edits puts back now
                wrap(attention, kinds)
                rewrapped += 1
    _register_checks(pipe, state)
    if rewrapped:
        logger.warning(f"the concept edit had been removed from {rewrapped} layer(s) (their attention processor "
                       "or hooks were replaced); it was installed again")


def _at(component, name: str, prefix: str):
    try:
        return component.get_submodule(name)
    except AttributeError:
        raise RuntimeError(f"{prefix}.{name}, which the concept edit changes, is no longer in the model: put it back, "
                           "or call unload_concept_edits()") from None

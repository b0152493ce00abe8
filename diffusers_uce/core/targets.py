"""Finding the layers UCE edits: every cross-attention (``attn2``) ``to_k``/``to_v`` of the denoiser, or the named
linear layers of a family's target group (FLUX)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Projection:
    """One edited linear map ``y = W c (+ b)``: the ``to_k``/``to_v`` of a cross-attention module, or a named layer.

    Args:
        attention (`str`): name of the attention module inside the denoiser (e.g.
        ``"mid_block.attentions.0...attn2"``),
            or of the layer itself when `kind` is empty.
        kind (`str`): ``"to_k"``, ``"to_v"``, or ``""`` for a named linear layer.
        module (`torch.nn.Linear`): the projection.
    """

    attention: str
    kind: str
    module: torch.nn.Linear

    @property
    def name(self) -> str:
        return f"{self.attention}.{self.kind}" if self.kind else self.attention


LayerFilter = Sequence[str] | Callable[[str], bool] | None


def check_layer_filter(layers: LayerFilter) -> None:
    if layers is not None and not callable(layers):
        if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
            raise TypeError("layers must be a list of name substrings or a callable taking a module name")


def _selected(name: str, layers: LayerFilter) -> bool:
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(name))
    return any(pattern in name for pattern in layers)


def reads_fused_projections(processor) -> bool:
    """Whether an attention processor computes keys and values with the fused projection that
    ``fuse_qkv_projections()`` adds (``to_kv``/``to_qkv``) instead of the module's own ``to_k``/``to_v``.

    What computes keys and values is the processor that runs: ``unfuse_qkv_projections()`` puts the unfused
    processors back but leaves ``Attention.fused_projections`` set (and ``to_kv`` in place), so neither is a sign of
    fused projections. Every fused processor of diffusers is named ``Fused...``.
    """
    return "Fused" in type(processor).__name__


def find_projections(denoiser: torch.nn.Module, *, edit_keys: bool = True, layers: LayerFilter = None,
                     context_dim: int | None = None) -> list[Projection]:
    """List the projections to edit, in module order, after checking they can be edited.

    Args:
        denoiser (`torch.nn.Module`): the UNet.
        edit_keys (`bool`, defaults to `True`): include ``to_k`` (``to_v`` is always included).
        layers (`list[str]` or `Callable[[str], bool]`, *optional*): keep only cross-attention modules whose name
            contains one of these strings (or for which the callable returns `True`).
        context_dim (`int`, *optional*): the text hidden size the projections must accept.

    Raises:
        ValueError: no cross-attention, projections fused with ``fuse_qkv_projections()``, a filter that matches
            nothing, or a text hidden size that does not match.
    """
    check_layer_filter(layers)
    attentions = [
        (name, module) for name, module in denoiser.named_modules()
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
    ]
    if not attentions:
        raise ValueError(
            f"{type(denoiser).__name__} has no cross-attention (attn2) layers: UCE edits the text-conditioned "
            "projections of a text-to-image denoiser such as a Stable Diffusion UNet"
        )
    wrapped = [f"{name}.{kind}" for name, module in attentions for kind in ("to_k", "to_v")
               if hasattr(getattr(module, kind, None), "base_layer")]
    if wrapped:
        raise ValueError(
            f"a LoRA is loaded on {wrapped[0]} (and {len(wrapped) - 1} more projections): fuse it into the weights "
            "first (pipe.fuse_lora(); pipe.unload_lora_weights()) or unload it (pipe.unload_lora_weights()) before "
            "editing concepts, or apply the concept edit before loading the LoRA"
        )
    fused = [name for name, module in attentions if reads_fused_projections(getattr(module, "processor", None))
             or not isinstance(getattr(module, "to_k", None), torch.nn.Linear)]
    if fused:
        raise ValueError(
            f"the key/value projections of {fused[0]} (and {len(fused) - 1} more) are fused (fuse_qkv_projections()); "
            "call unfuse_qkv_projections() before editing concepts"
        )
    selected = [(name, module) for name, module in attentions if _selected(name, layers)]
    if not selected:
        raise ValueError(
            f"layers={layers!r} matches none of the {len(attentions)} cross-attention modules, e.g. "
            f"{attentions[0][0]!r}"
        )
    kinds = ("to_k", "to_v") if edit_keys else ("to_v",)
    projections = [Projection(name, kind, getattr(module, kind)) for name, module in selected for kind in kinds]
    if context_dim is not None:
        wrong = [p for p in projections if p.module.in_features != context_dim]
        if wrong:
            raise ValueError(
                f"{wrong[0].name} takes {wrong[0].module.in_features}-dim inputs but the text encoder gives "
                f"{context_dim}-dim states: this pipeline's denoiser and text encoder do not match"
            )
    return projections


def expand_names(component: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """Module names of `component` matching `names`, in module order; ``*`` in a name stands for one name part
    (``"transformer_blocks.*.attn2.to_k"``: every block's). A name without ``*`` is kept as it is, found or not."""
    if not any("*" in n for n in names):
        return list(names)
    patterns = [re.compile("^" + r"[^.]+".join(map(re.escape, n.split("*"))) + "$") for n in names]
    found = [m for m, _ in component.named_modules() if any(p.match(m) for p in patterns)]
    exact = [n for n in names if "*" not in n]
    missing = [n for n, p in zip(names, patterns) if "*" in n and not any(p.match(m) for m in found)]
    if missing:
        raise ValueError(f"{type(component).__name__} has no layer matching {missing[0]!r}: this is not the model "
                         "the pipeline family expects")
    return list(dict.fromkeys(exact + found))


def find_linear_layers(component: torch.nn.Module, names: tuple[str, ...], *, layers: LayerFilter = None,
                       context_dim: int | None = None, edit_keys: bool = True) -> list[Projection]:
    """The named linear layers of a target group (e.g. FLUX's ``context_embedder``), filtered by `layers`.

    Args:
        component (`torch.nn.Module`): the denoiser.
        names (`tuple[str, ...]`): layer names; ``*`` stands for one name part (`expand_names`).
        layers (`list[str]` or `Callable[[str], bool]`, *optional*): keep only the layers whose name contains one of
            these strings (or for which the callable returns `True`).
        context_dim (`int`, *optional*): the input width the layers must take (`None`: the first layer's, which
            every other must share).
        edit_keys (`bool`, defaults to `True`): keep key projections (names ending in ``to_k``).

    Raises:
        ValueError: a layer is missing or not a `torch.nn.Linear`, carries a LoRA, or takes inputs of another width.
    """
    check_layer_filter(layers)
    found, checked = [], []
    for name in expand_names(component, names):
        try:
            module = component.get_submodule(name)
        except AttributeError:
            module = None
        if hasattr(module, "base_layer"):
            raise ValueError(f"a LoRA is loaded on {name}: fuse it into the weights first (pipe.fuse_lora(); "
                             "pipe.unload_lora_weights()) or unload it before editing concepts")
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{type(component).__name__} has no linear layer {name!r} to edit (found "
                             f"{type(module).__name__ if module is not None else 'nothing'} there): this is not the "
                             "model the pipeline family expects, or not a layer concept editing can change")
        if context_dim is not None and module.in_features != context_dim:
            raise ValueError(f"{name} takes {module.in_features}-dim inputs but its text encoder gives "
                             f"{context_dim}-dim states: this pipeline's denoiser and text encoder do not match")
        if checked and module.in_features != checked[0][1].in_features:
            raise ValueError(f"{name} takes {module.in_features}-dim inputs but {checked[0][0]} takes "
                             f"{checked[0][1].in_features}-dim ones: layers edited together must read the same input")
        checked.append((name, module))
        if _selected(name, layers) and (edit_keys or not name.endswith("to_k")):
            found.append(Projection(name, "", module))
    return found

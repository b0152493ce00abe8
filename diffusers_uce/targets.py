"""Finding the layers UCE edits: every cross-attention (``attn2``) ``to_k``/``to_v`` of the denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Projection:
    """One edited linear map ``y = W c``: the ``to_k`` or ``to_v`` of a cross-attention module.

    Args:
        attention (`str`): name of the attention module inside the denoiser (e.g. ``"mid_block.attentions.0...attn2"``).
        kind (`str`): ``"to_k"`` or ``"to_v"``.
        module (`torch.nn.Linear`): the projection.
    """

    attention: str
    kind: str
    module: torch.nn.Linear

    @property
    def name(self) -> str:
        return f"{self.attention}.{self.kind}"


LayerFilter = Sequence[str] | Callable[[str], bool] | None


def _selected(name: str, layers: LayerFilter) -> bool:
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(name))
    return any(pattern in name for pattern in layers)


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
    if layers is not None and not callable(layers):
        if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
            raise TypeError("layers must be a list of name substrings or a callable taking a module name")
    attentions = [
        (name, module) for name, module in denoiser.named_modules()
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
    ]
    if not attentions:
        raise ValueError(
            f"{type(denoiser).__name__} has no cross-attention (attn2) layers: UCE edits the text-conditioned "
            "projections of a text-to-image denoiser such as a Stable Diffusion UNet"
        )
    fused = [name for name, module in attentions if "Fused" in type(getattr(module, "processor", None)).__name__
             or not isinstance(getattr(module, "to_k", None), torch.nn.Linear)]
    if fused:
        raise ValueError(
            f"the key/value projections of {fused[0]} (and {len(fused) - 1} more) are fused (fuse_qkv_projections()); "
            "call unfuse_qkv_projections() before editing concepts"
        )
    selected = [(name, module) for name, module in attentions if _selected(name, layers)]
    if not selected:
        raise ValueError(
            f"layers={layers!r} matches none of the {len(attentions)} cross-attention modules, e.g. {attentions[0][0]!r}"
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

"""LoRA export: write an applied concept edit as a diffusers-format LoRA that plain diffusers (with PEFT) loads.

A UCE edit changes each edited projection by ``ΔW_ℓ = W_ℓ (T_ℓ − I)``, which is low rank (≤ the number of edit
tokens), so it is an exact LoRA. The factors come from `solve.shared_low_rank` (one SVD of ``T − I`` for all layers)
or `solve.per_layer_low_rank` ("tensor" technique). Keys follow diffusers' PEFT format for the UNet,
``unet.<module path>.lora_A.weight`` (r×d) and ``unet.<module path>.lora_B.weight`` (out×r), and the header holds the
`LoraConfig` (``lora_adapter_metadata``) with ``lora_alpha = r`` for every module: the LoRA scale is 1.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from diffusers.utils import logging

from .io import atomic_save_safetensors, check_weight_name, library_versions
from .solve import Correction, LowRankFactors, edited_weights, per_layer_low_rank, shared_low_rank

logger = logging.get_logger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def lora_config(names: list[str], ranks: list[int]) -> dict:
    """The `peft.LoraConfig` arguments of a LoRA with per-module ranks and scale 1 (``alpha = r``) everywhere.

    Args:
        names (`list[str]`): module paths inside the denoiser.
        ranks (`list[int]`): rank of each module.
    """
    common = max(set(ranks), key=ranks.count)
    pattern = {f"^{name}": r for name, r in zip(names, ranks) if r != common}  # "^": diffusers' anchored pattern keys
    return {
        "r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": list(names), "use_dora": False, "lora_bias": False,
    }


def lora_state_dict(prefix: str, names: list[str], factors: LowRankFactors,
                    dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a diffusers LoRA file for `factors` (modules of rank 0 are left out).

    Args:
        prefix (`str`): the component, e.g. ``"unet"``.
        names (`list[str]`): module path of each layer inside the component.
        factors (`LowRankFactors`): ``ΔW_ℓ ≈ up[ℓ] @ down[ℓ]``.
        dtype (`torch.dtype`, defaults to float32): dtype of the stored factors.
    """
    tensors, kept, ranks = {}, [], []
    for name, up, down in zip(names, factors.up, factors.down):
        if down.shape[0] == 0:
            continue
        tensors[f"{prefix}.{name}.lora_A.weight"] = down.to(dtype)
        tensors[f"{prefix}.{name}.lora_B.weight"] = up.to(dtype)
        kept.append(name)
        ranks.append(down.shape[0])
    config = {f"{prefix}.{k}": v for k, v in lora_config(kept, ranks).items()}
    return tensors, {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


class UCELoraMixin:
    """`save_concept_edits_as_lora`: LoRA export (part of `UCEMixin`)."""

    def save_concept_edits_as_lora(
        self, save_directory: str | os.PathLike, *, rank: int | None = None, weight_name: str = LORA_WEIGHT_NAME,
        overwrite: bool = False,
    ) -> float:
        r"""Write the applied concept edit, at its current strength, as a LoRA for the denoiser.

        The edit is exactly low rank, so at the default (exact) rank the LoRA reproduces the fused edit up to float
        error; a smaller `rank` keeps the best approximation of ``T − I`` (one SVD shared by every layer) or, for the
        "tensor" technique, of each layer's change. Load it without this plugin, with PEFT installed:
        `StableDiffusionPipeline.from_pretrained(...).load_lora_weights(save_directory)`.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write into (created if needed).
            rank (`int`, *optional*): the largest LoRA rank per module; the exact rank of the edit by default.
            weight_name (`str`, defaults to `"pytorch_lora_weights.safetensors"`): the file name (what
                `load_lora_weights` looks for by default); must end in `.safetensors`.
            overwrite (`bool`, defaults to `False`): replace an existing file of that name.

        Returns:
            `float`: the relative error ``‖ΔW_approx − ΔW‖_F / ‖ΔW‖_F`` over all edited layers (0 up to float error at
            the exact rank).

        Example:
        ```py
        >>> pipe.apply_concept_edits(erase=["Van Gogh"], guide="art")
        >>> pipe.save_concept_edits_as_lora("./van-gogh-lora")
        >>> plain = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
        >>> plain.load_lora_weights("./van-gogh-lora")
        ```
        """
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None (the exact rank), got {rank!r}")
        check_weight_name(weight_name)
        state = self._uce_require_state("export")
        if state.scale == 0:
            raise ValueError("the concept edit strength is 0, so the edit changes nothing: there is no LoRA to export; "
                             "call set_concept_edit_scale() with a non-zero strength first")
        originals = state.original_weights if state.fused else [p.module.weight for p in state.projections]
        device = self._execution_device
        weights = torch.cat([w.detach().to(device=device, dtype=torch.float64) for w in originals])
        sizes = [w.shape[0] for w in originals]
        solution = state.solution.to(device=device, dtype=torch.float64)
        eye = torch.eye(solution.transform.shape[0], dtype=torch.float64, device=device)
        delta = state.scale * (solution.transform - eye)
        if solution.correction is None:
            factors = shared_low_rank(weights, sizes, delta, rank)
        else:
            c = solution.correction
            row_layer = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                                torch.tensor(sizes, device=device))
            changes = edited_weights(weights, delta, Correction(c.tokens, c.solved, c.coef * state.scale), row_layer)
            factors = per_layer_low_rank(list(changes.split(sizes)), rank)
        if max(factors.exact_rank) == 0:
            raise ValueError("the concept edit changes no weight: there is no LoRA to export")
        names = [p.name for p in state.projections]
        tensors, header = lora_state_dict(self._uce_denoiser_name, names, factors)
        header["diffusers_uce"] = json.dumps({
            "edits": [r.to_dict() for r in state.records], "scale": state.scale, "rank": rank,
            "relative_error": factors.relative_error, "versions": library_versions(),
        })
        path = atomic_save_safetensors(tensors, save_directory, weight_name, header, overwrite=overwrite)
        ranks = sorted(set(factors.rank))
        logger.info(f"Saved the concept edit as a LoRA of rank {ranks[0] if len(ranks) == 1 else ranks} "
                    f"(exact rank {max(factors.exact_rank)}) on {len(tensors) // 2} modules to {path}; relative "
                    f"error {factors.relative_error:.3g}")
        if importlib.util.find_spec("peft") is None:
            logger.warning("loading this LoRA with load_lora_weights() needs PEFT: pip install 'diffusers-uce[lora]' "
                           "(or pip install peft)")
        return factors.relative_error

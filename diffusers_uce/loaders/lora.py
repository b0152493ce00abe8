"""LoRA export: write an applied concept edit as a diffusers-format LoRA that plain diffusers (with PEFT) loads.

A UCE edit changes each edited layer by ``ΔW_ℓ = W_ℓ (T_ℓ − I)``, which is low rank (≤ the number of edit tokens),
so it is an exact LoRA. A layer with a bias (FLUX's ``context_embedder`` and pooled-text ``linear_1``) keeps its bias
and changes by ``ΔW = W (T − I) + b uᵀ`` (one rank more): the ``[W | b] (T̃ − I)`` of the homogeneous form, first d
columns. The factors come from `lowrank.shared_low_rank` (one SVD of ``T − I`` per target group) or
`lowrank.per_layer_low_rank` ("tensor" technique). Keys follow diffusers' PEFT format, prefixed by the component the
family's loader expects: ``unet.<module>.lora_A.weight`` (r×d) / ``lora_B.weight`` (out×r) for SD 1.x/2.x and SDXL,
``transformer.<module>...`` for FLUX; the header holds the `LoraConfig` (``lora_adapter_metadata``) with
``lora_alpha = r`` for every module: the LoRA scale is 1. `StableDiffusionPipeline`, `StableDiffusionXLPipeline` and
`FluxPipeline`'s `load_lora_weights` load it as is (PEFT wraps any `nn.Linear`, ``context_embedder`` included).
``format="kohya"`` writes the same factors in the kohya/sd-scripts layout of AUTOMATIC1111 and ComfyUI
(`lora_kohya`).
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from diffusers.utils import logging

from ..core.lowrank import LowRankFactors, layerwise_low_rank, per_layer_low_rank, shared_low_rank
from ..core.solve import Correction, edited_weights
from ..utils.checks import check_base_model, check_license, is_whole_number
from ..utils.files import atomic_save_safetensors, check_weight_name
from ..utils.folders import atomic_folder
from .lora_kohya import (
    KOHYA_WEIGHT_NAME,
    LORA_RECORD_KEY,
    check_lora_format,
    kohya_base_version,
    kohya_metadata,
    kohya_state_dict,
)
from .state_mixin import serialized

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

    @serialized
    def save_concept_edits_as_lora(
        self, save_directory: str | os.PathLike, *, rank: int | None = None, weight_name: str | None = None,
        overwrite: bool = False, write_model_card: bool = True, overwrite_model_card: bool = False,
        format: str = "diffusers", base_model: str | None = None, license: str | None = None,
    ) -> float:
        r"""Write the applied concept edit, at its current strength, as a LoRA for the denoiser (UNet or transformer).

        The edit is exactly low rank, so at the default (exact) rank the LoRA reproduces the fused edit up to float
        error; a smaller `rank` keeps the best approximation of ``T − I`` (one SVD per target group, shared by its
        layers) or, for the
        "tensor" technique, of each layer's change. Load it without this plugin, with PEFT installed, into the
        pipeline class of the same family: `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `FluxPipeline`
        `.from_pretrained(...).load_lora_weights(save_directory)`. The file's header also records the edit (records,
        strength, base model, report; key `"diffusers_uce"`), so that its card can be written again from the file
        alone, as a push of the folder does.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write into (created if needed).
            rank (`int`, *optional*): the largest LoRA rank per module; the exact rank of the edit by default.
            weight_name (`str`, *optional*): the file name; must end in `.safetensors`. Defaults to
                `"pytorch_lora_weights.safetensors"` (what `load_lora_weights` looks for) for the diffusers format and
                `"uce_lora.safetensors"` for the kohya one (AUTOMATIC1111 lists the LoRA by its file name).
            overwrite (`bool`, defaults to `False`): replace an existing file of that name.
            write_model_card (`bool`, defaults to `True`): also write a `README.md` model card (`base_model_relation:
                adapter`) that records every edit; with the installed plugin only (the single-file community pipeline
                writes none).
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the folder (it is
                kept otherwise, unless it is a card diffusers-uce wrote and nobody edited since).
            format (`str`, defaults to `"diffusers"`): `"diffusers"` (PEFT keys and `LoraConfig` header) or
                `"kohya"`: the same factors as one file in the kohya/sd-scripts layout that AUTOMATIC1111 and ComfyUI
                load (``lora_unet_*.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` = rank, SGM block names for
                SDXL, sd-scripts' ``ss_*`` and ``modelspec.*`` metadata); diffusers' `load_lora_weights` reads it
                too. SD 1.x/2.x and SDXL only (see `diffusers_uce.loaders.lora_kohya`).
            base_model (`str`, *optional*): the Hub id of the base model (`"owner/name"`) for the card's metadata, when
                the pipeline was loaded from a local folder; by default the pipeline's `name_or_path` when it is a Hub
                id.
            license (`str`, *optional*): the licence id for the card's metadata; by default the base model's when it
                is a well-known model.

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
        if rank is not None and not is_whole_number(rank, 1):
            raise ValueError(f"rank must be a positive integer or None (the exact rank), got {rank!r}")
        check_lora_format(format)
        card = {"base_model": check_base_model(base_model), "license": check_license(license)}
        kohya = format == "kohya"
        weight_name = weight_name if weight_name is not None else KOHYA_WEIGHT_NAME if kohya else LORA_WEIGHT_NAME
        check_weight_name(weight_name)
        state = self._uce_require_state("export")
        if kohya:  # FLUX (or a UNet without SGM names) refused before any work
            kohya_base_version(self._uce_family.name, getattr(getattr(self, "unet", None), "config", None))
        if state.scale == 0:
            raise ValueError("the concept edit strength is 0, so the edit changes nothing: there is no LoRA to "
                             "export; "
                             "call set_concept_edit_scale() with a non-zero strength first")
        tensors, modules, exact, total, dropped = {}, {}, [], 0.0, 0.0
        for group, factors in zip(state.groups, lora_factors(state, rank, self._execution_device)):
            component = group.group.component
            part, _ = lora_state_dict(component, [p.name for p in group.projections], factors)
            tensors.update(part)
            modules.setdefault(component, []).extend((p.name, r) for p, r in zip(group.projections, factors.rank) if r)
            exact += factors.exact_rank
            # the kept part is orthogonal to the dropped one: ‖ΔW‖² = ‖kept‖² / (1 − error²)
            kept = sum(float(((u.T @ u) * (d @ d.T)).sum()) for u, d in zip(factors.up, factors.down))
            group_total = kept / max(1 - factors.relative_error ** 2, 1e-300)
            total, dropped = total + group_total, dropped + group_total * factors.relative_error ** 2
        if max(exact) == 0:
            raise ValueError("the concept edit changes no weight: there is no LoRA to export")
        relative_error = (dropped / total) ** 0.5 if total > 0 else 0.0
        config = {f"{component}.{k}": v for component, kept in modules.items()
                  for k, v in lora_config([n for n, _ in kept], [r for _, r in kept]).items()}
        header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
        header[LORA_RECORD_KEY] = json.dumps({**self._uce_saved_record(state), "rank": rank,
                                               "relative_error": relative_error})
        if kohya:
            unet_config = self.unet.config
            tensors = kohya_state_dict(tensors, next(iter(modules)), unet_config,
                                       sgm=self._uce_family.name == "stable-diffusion-xl")
            header = kohya_metadata(tensors, state.records, self._uce_family.name, unet_config,
                                    weight_name[:-len(".safetensors")], header[LORA_RECORD_KEY],
                                    getattr(self.scheduler.config, "prediction_type", "epsilon"))
        with atomic_folder(save_directory, update=True) as folder:  # the LoRA and its card, swapped in as one unit
            atomic_save_safetensors(tensors, folder, weight_name, header, overwrite=overwrite)
            if write_model_card:
                self._uce_write_model_card(folder, "adapter", overwrite=overwrite_model_card, **card)
        path = os.path.join(os.fspath(save_directory), weight_name)
        ranks = sorted({r for kept in modules.values() for _, r in kept})
        modules_saved = [n for kept in modules.values() for n, _ in kept]
        logger.info(f"Saved the concept edit as a LoRA of rank {ranks[0] if len(ranks) == 1 else ranks} "
                    f"(exact rank {max(exact)}) on {len(modules_saved)} modules to {path}; relative "
                    f"error {relative_error:.3g}")
        if not kohya and importlib.util.find_spec("peft") is None:
            logger.warning("loading this LoRA with load_lora_weights() needs PEFT: pip install 'diffusers-uce[lora]' "
                           "(or pip install peft)")
        return relative_error


def lora_factors(state, rank: int | None = None, device="cpu") -> list[LowRankFactors]:
    """LoRA factors of each target group's weight change at the edit's current strength, in float64.

    Args:
        state (`EditState`): an applied edit (fused or not).
        rank (`int`, *optional*): the largest rank per layer; the exact rank by default.
        device (`str` or `torch.device`, defaults to `"cpu"`): where to compute.

    Returns:
        `list[LowRankFactors]`: one per group of ``state.groups``: ``ΔW_ℓ ≈ up[ℓ] @ down[ℓ]``.
    """
    return [_group_factors(group, state.scale, rank, device) for group in state.groups]


def _group_factors(group, scale: float, rank: int | None, device) -> LowRankFactors:
    """LoRA factors of one target group's change at strength `scale` (a biased group's bias column dropped: the
    LoRA changes ``W`` only, and ``W' − W = [W | b] (T̃ − I)`` restricted to the first d columns)."""
    sizes = [p.module.weight.shape[0] for p in group.projections]
    solution = group.solution.to(device=device, dtype=torch.float64)
    if solution.layerwise is None and solution.correction is None and not group.biased:
        # one shared transform: each layer's factor from its own weights, without a float64 copy of them all
        eye = torch.eye(solution.transform.shape[0], dtype=torch.float64, device=device)
        return shared_low_rank(group.originals(), sizes, scale * (solution.transform - eye), rank)
    weights, row_layer = group.stacked(device)
    weights = weights.to(torch.float64)
    if solution.layerwise is not None:
        return layerwise_low_rank(weights, row_layer, sizes, solution.layerwise.times(scale),
                                  weights.shape[1] - group.biased, rank)
    eye = torch.eye(solution.transform.shape[0], dtype=torch.float64, device=device)
    delta = scale * (solution.transform - eye)
    d = weights.shape[1] - group.biased
    if solution.correction is None:
        factors = shared_low_rank(weights, sizes, delta[:, :d], rank)
    else:
        c = solution.correction
        changes = edited_weights(weights, delta, Correction(c.tokens, c.solved, c.coef * scale), row_layer)
        factors = per_layer_low_rank(list(changes[:, :d].split(sizes)), rank)
    return factors

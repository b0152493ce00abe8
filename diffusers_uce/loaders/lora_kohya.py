"""LoRA export in the kohya/sd-scripts layout: one ``.safetensors`` file that AUTOMATIC1111 and ComfyUI load.

The factors are those of the diffusers export (`lora.lora_state_dict`), renamed: ``unet.<module>.lora_A.weight`` →
``lora_unet_<module with "." as "_">.lora_down.weight``, ``lora_B`` → ``lora_up``, plus a 0-d float ``.alpha``
equal to the module's rank (LoRA scale ``alpha / rank = 1``): diffusers' own `convert_state_dict_to_kohya` does the
renaming. SD 1.x/2.x files keep the diffusers UNet module names (sd-scripts trains those on the diffusers UNet);
SDXL files use the original SGM block names (``input_blocks_4_1``, ``middle_block_1``, ``output_blocks_0_1``), as
sd-scripts writes them, mapped from the UNet config (see `sgm_module_name`). FLUX is refused.
"""

from __future__ import annotations

import torch

LORA_FORMATS = ("diffusers", "kohya")
KOHYA_WEIGHT_NAME = "uce_lora.safetensors"
LORA_RECORD_KEY = "diffusers_uce"  # header key of the edit's records in both formats


def check_lora_format(format: str) -> str:
    """`format` if it is one of `LORA_FORMATS`, else a `ValueError` naming them."""
    if not isinstance(format, str) or format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, LORA_FORMATS))}, got {format!r}")
    return format


def sai_architecture(version: str, prediction_type: str = "epsilon") -> str:
    """The SAI model spec's ``modelspec.architecture`` of a base model (a LoRA for it appends ``"/lora"``).

    Args:
        version (`str`): ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        prediction_type (`str`, defaults to `"epsilon"`): the scheduler's; ``"v_prediction"`` is SD 2.x's 768-v.
    """
    if version == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if version == "sd1":
        return "stable-diffusion-v1"
    return f"stable-diffusion-v2-{'768-v' if prediction_type == 'v_prediction' else '512'}"


def kohya_base_version(family_name: str, unet_config, prediction_type: str = "epsilon") -> tuple[str, str]:
    """``(ss_base_model_version, modelspec.architecture)`` of a family, or a `ValueError` for FLUX.

    SD 2.x is told from SD 1.x by its UNet's linear ``proj_in``/``proj_out`` (``use_linear_projection``, set in every
    SD 2.x config and in none of SD 1.x), and its 768-v variant by the scheduler's ``v_prediction``.
    """
    if family_name == "stable-diffusion-xl":
        return "sdxl_base_v1-0", sai_architecture("sdxl") + "/lora"
    if family_name == "stable-diffusion":
        v2 = bool(getattr(unet_config, "use_linear_projection", False))
        return "sd_v2" if v2 else "sd_v1", sai_architecture("sd2" if v2 else "sd1", prediction_type) + "/lora"
    raise ValueError(f"format='kohya' is not supported for {family_name} pipelines (the kohya layout of their edited "
                     "text-embedding layers is not settled); use format='diffusers', which the pipeline's own "
                     "load_lora_weights reads")


def sgm_module_name(name: str, unet_config) -> str:
    """The SGM (original Stability) UNet path of a diffusers UNet module inside an attention block, for SDXL.

    The exact inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` (loaders/lora_conversion_utils.py), which is
    how diffusers reads sd-scripts' SDXL files, with ``L = layers_per_block``: ``down_blocks.b.attentions.j`` →
    ``input_blocks.{1 + b (L + 1) + j}.1`` (input block 0 is ``conv_in``, each down block has L layers and a
    downsampler); ``mid_block.attentions.0`` → ``middle_block.1``; ``up_blocks.b.attentions.j`` →
    ``output_blocks.{b (L + 1) + j}.1`` (each up block has L + 1 layers). Index ``.1`` is the attention block of
    the layer (``.0`` is its resnet), as in sd-scripts' ``sdxl_original_unet`` and the SGM checkpoints.
    """
    per_block = unet_config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"format='kohya' needs a UNet with one layers_per_block, got {per_block!r}; use "
                         "format='diffusers'")
    parts = name.split(".")
    if parts[0] == "mid_block" and parts[1:3] == ["attentions", "0"]:
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3 and parts[2] == "attentions":
        block, layer = int(parts[1]), int(parts[3])
        index = block * (per_block + 1) + layer + (parts[0] == "down_blocks")
        return ".".join(["input_blocks" if parts[0] == "down_blocks" else "output_blocks", str(index), "1",
                         *parts[4:]])
    raise ValueError(f"no SGM name for UNet module {name!r}; use format='diffusers'")


def kohya_state_dict(tensors: dict[str, torch.Tensor], component: str, unet_config,
                     sgm: bool) -> dict[str, torch.Tensor]:
    """The kohya tensors of a diffusers/PEFT LoRA state dict of the UNet (``unet.<module>.lora_A.weight``...).

    Args:
        tensors (`dict[str, torch.Tensor]`): what `lora.lora_state_dict` returns.
        component (`str`): the key prefix of `tensors` (``"unet"``).
        unet_config: the UNet's config (for SDXL's SGM block names).
        sgm (`bool`): write SGM block names (SDXL) instead of diffusers ones (SD 1.x/2.x).
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    if component != "unet":
        raise ValueError(f"format='kohya' exports a UNet LoRA, not one of {component!r}; use format='diffusers'")
    renamed = {}
    for key, tensor in tensors.items():
        module, _, suffix = key[len("unet."):].rpartition(".lora_")
        renamed[f"unet.{sgm_module_name(module, unet_config) if sgm else module}.lora_{suffix}"] = tensor
    out = convert_state_dict_to_kohya(renamed)
    # diffusers writes the alpha as an integer tensor; sd-scripts' (and what A1111/ComfyUI expect) is a float
    return {k: v.to(torch.float32) if k.endswith(".alpha") else v for k, v in out.items()}


def kohya_title(records) -> str:
    """``"UCE: erase van gogh, picasso; debias doctor"``: what the edits do, for ``modelspec.title``."""
    parts = []
    for record in records:
        if record.erase:
            parts.append("erase " + ", ".join(record.erase))
        if record.debias:
            parts.append("debias " + ", ".join(t.concept for t in record.debias))
    return "UCE: " + ("; ".join(parts) or "concept edit")


def kohya_metadata(tensors: dict[str, torch.Tensor], records, family_name: str, unet_config, output_name: str,
                   uce_json: str, prediction_type: str = "epsilon") -> dict[str, str]:
    """The header of a kohya file: sd-scripts' training keys and the SAI model spec that A1111/ComfyUI show.

    Args:
        tensors (`dict[str, torch.Tensor]`): the kohya tensors (for the ranks).
        records (`list[ConceptEdit]`): the applied edits (for the title).
        family_name (`str`): the pipeline family's name.
        unet_config: the UNet's config.
        output_name (`str`): the file name without ``.safetensors`` (what A1111 lists it as).
        uce_json (`str`): the JSON of the edit's records (``LORA_RECORD_KEY``) the diffusers format writes too.
        prediction_type (`str`, defaults to `"epsilon"`): the scheduler's (tells SD 2.x 768-v apart).
    """
    version, architecture = kohya_base_version(family_name, unet_config, prediction_type)
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")]
    dim = max(set(ranks), key=ranks.count)  # the common rank; every module has its own alpha = its rank
    title = kohya_title(records)
    return {
        "format": "pt",
        "ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
        "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"), "ss_output_name": output_name,
        "ss_training_comment": f"{title} (Unified Concept Editing: a closed-form edit, no training)",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers", "modelspec.title": title,
        LORA_RECORD_KEY: uce_json,
    }

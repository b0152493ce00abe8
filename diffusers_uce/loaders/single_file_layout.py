"""The original single-file layout of Stable Diffusion 1.x/2.x and SDXL checkpoints (CompVis LDM, Stability SGM):
where each weight of a diffusers pipeline goes in the one ``.safetensors`` file that AUTOMATIC1111, ComfyUI and
diffusers' `from_single_file` load. diffusers converts only in that direction; this is the way back.

Each component sits under a prefix (`SINGLE_FILE_LAYOUTS`) in the layout of the code it comes from:

- the UNet under ``model.diffusion_model.``: ``input_blocks.{i}`` / ``middle_block.{i}`` / ``output_blocks.{i}``
  (``.0`` the resnet, ``.1`` the attention, the down/upsampler in a layer of its own), resnet parts as
  ``in_layers``/``out_layers``/``emb_layers``/``skip_connection``, attention blocks with their diffusers names;
- the VAE under ``first_stage_model.``: ``encoder.down.{i}.block.{j}``, ``decoder.up.{i}`` numbered from the
  bottom (diffusers' ``up_blocks`` reversed), ``mid.block_1``/``attn_1``/``block_2``, the attention's ``q``, ``k``,
  ``v``, ``proj_out`` as 1×1 convolutions (the diffusers linear weights with two unit dimensions added);
- OpenAI CLIP text encoders keep their transformers names under ``<prefix>text_model.`` (SD 1.x
  ``cond_stage_model.transformer.``, SDXL's first ``conditioner.embedders.0.transformer.``);
- OpenCLIP text encoders (SD 2.x ``cond_stage_model.model.``, SDXL's second ``conditioner.embedders.1.model.``) use
  OpenCLIP's names: ``transformer.resblocks.{i}`` with ``ln_1``/``ln_2``/``mlp.c_fc``/``mlp.c_proj``, query, key and
  value stacked in ``attn.in_proj_weight``/``in_proj_bias``, ``positional_embedding``, ``ln_final`` and the
  ``text_projection`` matrix transposed. A diffusers SD 2.x text encoder has one layer less than OpenCLIP-H (the
  last is never used: SD 2.x reads the penultimate layer), so the file has one too, as diffusers' own conversion
  script writes it.

A component's mapping is a table from diffusers module paths to original ones, built from its config
(`component_table`); `single_file_plan` places every key of a state dict, or names those that have no place, before
any tensor is touched, and `single_file_tensors` builds the tensors. Every change of a tensor is exact (a reshape, a
transpose, a stack).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

# How a tensor goes into the file: as is, a linear weight as a 1x1 convolution, transposed; an int is the tensor's
# position in a stack of several (OpenCLIP's query/key/value).
COPY, CONV, TRANSPOSE, STACK = "copy", "conv", "transpose", "stack"

# (pipeline component, key prefix in the file, kind of table) of each layout.
SINGLE_FILE_LAYOUTS = {
    "sd1": (("unet", "model.diffusion_model.", "unet"), ("vae", "first_stage_model.", "vae"),
            ("text_encoder", "cond_stage_model.transformer.", "clip")),
    "sd2": (("unet", "model.diffusion_model.", "unet"), ("vae", "first_stage_model.", "vae"),
            ("text_encoder", "cond_stage_model.model.", "open_clip")),
    "sdxl": (("unet", "model.diffusion_model.", "unet"), ("vae", "first_stage_model.", "vae"),
             ("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")),
}
SUPPORTED_FAMILIES = {"stable-diffusion": ("sd1", "sd2"), "stable-diffusion-xl": ("sdxl",)}

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": ("norm", COPY), "to_q": ("q", CONV), "to_k": ("k", CONV), "to_v": ("v", CONV),
                  "to_out.0": ("proj_out", CONV)}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")  # stacked in this order
_TEXT_MODEL = "text_model."  # transformers' CLIPTextModel drops this level in recent versions: both are read

Table = dict[str, tuple[str | None, str | int]]  # diffusers module path -> (original one, None: left out; how)
Plan = dict[str, tuple[tuple[str, ...], str]]  # original key -> (diffusers keys, how)


def check_single_file_family(family_name: str) -> tuple[str, ...]:
    """The layouts a pipeline family can be written in, or a `ValueError` before anything is done (FLUX...)."""
    if family_name not in SUPPORTED_FAMILIES:
        raise ValueError(f"single-file export supports Stable Diffusion 1.x/2.x and SDXL, not {family_name} "
                         "pipelines; use save_pretrained (a folder diffusers loads) or the LoRA export")
    return SUPPORTED_FAMILIES[family_name]


def text_encoder_kind(hidden_act: str) -> str:
    """``"clip"`` (OpenAI CLIP, quick GELU: SD 1.x, SDXL's first encoder) or ``"open_clip"`` (OpenCLIP, GELU: SD 2.x,
    SDXL's second): what a CLIP text encoder was trained as decides the layout, and so the code that runs it."""
    kinds = {"quick_gelu": "clip", "gelu": "open_clip"}
    if hidden_act not in kinds:
        raise ValueError(f"a text encoder with hidden_act={hidden_act!r} is neither OpenAI CLIP (quick_gelu) nor "
                         "OpenCLIP (gelu): it has no original single-file layout")
    return kinds[hidden_act]


def single_file_layout(family_name: str, hidden_acts: dict[str, str]) -> str:
    """The layout (a key of `SINGLE_FILE_LAYOUTS`) of a pipeline, from its family and the ``hidden_act`` of each of
    its text encoders (by component name): a Stable Diffusion pipeline with an OpenCLIP text encoder is SD 2.x.

    Raises:
        `ValueError`: the family has no single-file layout (FLUX), or its text encoders fit none.
    """
    for layout in check_single_file_family(family_name):
        texts = [(c, kind) for c, _, kind in SINGLE_FILE_LAYOUTS[layout] if kind in ("clip", "open_clip")]
        if all(text_encoder_kind(hidden_acts[c]) == kind for c, kind in texts):
            return layout
    raise ValueError(f"the text encoders of this {family_name} pipeline ({hidden_acts}) do not match its original "
                     "layout (SDXL: OpenAI CLIP first, OpenCLIP second)")


def _with_parts(table: Table, source: str, target: str, parts: dict, how: str = COPY) -> None:
    for old, new in parts.items():
        new, part_how = new if isinstance(new, tuple) else (new, how)
        table[f"{source}.{old}"] = (f"{target}.{new}", part_how)


def unet_table(config, keys: Iterable[str]) -> Table:
    """The UNet's table, from its config (``layers_per_block`` must be one number, as in the original UNets) and its
    keys (an up block with attention has its upsampler one index further)."""
    per_block = config["layers_per_block"]
    if isinstance(per_block, bool) or not isinstance(per_block, int):
        raise ValueError(f"the original UNet layout needs one layers_per_block for every block, got {per_block!r}")
    keys = list(keys)
    mapping = DIFFUSERS_TO_LDM_MAPPING["unet"]
    table: Table = {k: (v, COPY) for k, v in mapping["layers"].items()}
    if config.get("addition_embed_type") == "text_time":
        table.update({k: (v, COPY) for k, v in mapping["addition_embed_type"].items()})
    if config.get("class_embed_type") in ("timestep", "projection"):
        table.update({k: (v, COPY) for k, v in mapping["class_embed_type"].items()})
    width = per_block + 1  # layers of a block in the original numbering: its resnets, then the down/upsampler
    for b in range(len(config["down_block_types"])):
        for j in range(per_block):
            layer = f"input_blocks.{1 + b * width + j}"
            _with_parts(table, f"down_blocks.{b}.resnets.{j}", f"{layer}.0", _UNET_RESNET)
            table[f"down_blocks.{b}.attentions.{j}"] = (f"{layer}.1", COPY)
        table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{(b + 1) * width}.0.op", COPY)
    table["mid_block.attentions.0"] = ("middle_block.1", COPY)
    for j in range(2):
        _with_parts(table, f"mid_block.resnets.{j}", f"middle_block.{2 * j}", _UNET_RESNET)
    for b in range(len(config["up_block_types"])):
        for j in range(width):
            layer = f"output_blocks.{b * width + j}"
            _with_parts(table, f"up_blocks.{b}.resnets.{j}", f"{layer}.0", _UNET_RESNET)
            table[f"up_blocks.{b}.attentions.{j}"] = (f"{layer}.1", COPY)
        attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys)
        table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{b * width + per_block}.{1 + attention}.conv",
                                                     COPY)
    return table


def vae_table(config) -> Table:
    """The VAE's table (`AutoencoderKL`), from its config."""
    table: Table = {k: (v, COPY) for k, v in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    for i in range(levels):
        for j in range(per_block):
            _with_parts(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", COPY)
        up = levels - 1 - i  # the original decoder numbers its levels from the bottom
        for j in range(per_block + 1):
            _with_parts(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET)
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{up}.upsample.conv", COPY)
    for coder in ("encoder", "decoder"):
        for j in range(2):
            _with_parts(table, f"{coder}.mid_block.resnets.{j}", f"{coder}.mid.block_{j + 1}", _VAE_RESNET)
        _with_parts(table, f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", _VAE_ATTENTION)
    return table


def clip_table() -> Table:
    """An OpenAI CLIP text encoder's table: its transformers names, always under ``text_model.``."""
    table: Table = {"text_model": ("text_model", COPY)}
    for part in ("embeddings", "encoder", "final_layer_norm"):
        table[part] = (f"text_model.{part}", COPY)
    for base in ("", _TEXT_MODEL):
        table[f"{base}embeddings.position_ids"] = (None, COPY)  # a buffer (older transformers save it)
    return table


def open_clip_table(num_layers: int) -> Table:
    """An OpenCLIP text encoder's table (`CLIPTextModel` or `CLIPTextModelWithProjection` in diffusers)."""
    fixed: Table = {k: (v, TRANSPOSE if k == "text_projection.weight" else COPY)
                    for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    table: Table = {}
    for base in (_TEXT_MODEL, ""):
        table.update({k.replace(_TEXT_MODEL, base, 1): v for k, v in fixed.items()})
        table[f"{base}embeddings.position_ids"] = (None, COPY)
        for i in range(num_layers):
            layer, block = f"{base}encoder.layers.{i}", f"transformer.resblocks.{i}"
            _with_parts(table, layer, block, _OPEN_CLIP_LAYER)
            for position, projection in enumerate(_OPEN_CLIP_QKV):
                for kind in ("weight", "bias"):
                    table[f"{layer}.self_attn.{projection}.{kind}"] = (f"{block}.attn.in_proj_{kind}", position)
    return table


def component_table(kind: str, config, keys: Iterable[str]) -> Table:
    """The table of a component of `kind` (``"unet"``, ``"vae"``, ``"clip"`` or ``"open_clip"``).

    Args:
        kind (`str`): the kind, as in `SINGLE_FILE_LAYOUTS`.
        config: the model's config (a diffusers config for the UNet and VAE, a transformers one for text encoders).
        keys (`Iterable[str]`): the model's state-dict keys.
    """
    if kind == "unet":
        return unet_table(config, keys)
    if kind == "vae":
        return vae_table(config)
    if kind == "clip":
        return clip_table()
    return open_clip_table(config.num_hidden_layers)


def single_file_plan(table: Table, keys: Iterable[str], prefix: str) -> Plan:
    """Place every key of a component's state dict in the file: ``{original key: (diffusers keys, how)}``.

    A key goes where the longest module path of the table that contains it goes, the rest of its path unchanged.

    Raises:
        `ValueError`: keys with no place in the original layout (listed), or two keys placed on one.
    """
    placed: dict[str, list] = {}
    hows: dict[str, str] = {}
    unplaced = []
    for key in keys:
        parts = key.split(".")
        entry = next(((cut, table[".".join(parts[:cut])]) for cut in range(len(parts), 0, -1)
                      if ".".join(parts[:cut]) in table), None)
        if entry is None:
            unplaced.append(key)
            continue
        cut, (target, how) = entry
        if target is None:
            continue
        target = ".".join([prefix + target, *parts[cut:]])
        stacked = isinstance(how, int)
        sources = placed.setdefault(target, [None] * len(_OPEN_CLIP_QKV) if stacked else [None])
        slot = how if stacked else 0
        if hows.setdefault(target, STACK if stacked else how) != (STACK if stacked else how) or sources[slot]:
            other = next(s for s in sources if s is not None)
            raise ValueError(f"{key} and {other} both go to {target} in the original single-file layout")
        sources[slot] = key
    if unplaced:
        shown = ", ".join(unplaced[:5]) + (f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else "")
        raise ValueError(f"{len(unplaced)} weight(s) have no place in the original single-file layout: {shown} "
                         "(a fused LoRA, fused QKV projections or a modified architecture? unfuse or unload it first)")
    incomplete = [t for t, sources in placed.items() if None in sources]
    if incomplete:
        raise ValueError(f"the original layout stacks query, key and value in {incomplete[0]}, but this model lacks "
                         "one of them")
    return {target: (tuple(sources), hows[target]) for target, sources in placed.items()}


def single_file_tensors(plan: Plan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | Callable]:
    """The tensors of the file for one component: `tensors` (its state dict) placed by `plan`.

    Reshapes and transposes are views of the weights; a stacked tensor is a function that makes it, so a writer
    builds it when it writes it and no more than one stacked copy exists at a time.

    Args:
        plan (`Plan`): what `single_file_plan` returned for these keys.
        tensors (`dict[str, torch.Tensor]`): the component's state dict.
    """
    out = {}
    for target, (sources, how) in plan.items():
        parts = [tensors[k].detach() for k in sources]
        if how == STACK:
            out[target] = partial(torch.cat, parts)
        elif how == TRANSPOSE:
            out[target] = parts[0].T
        elif how == CONV and parts[0].dim() == 2:
            out[target] = parts[0][:, :, None, None]
        else:
            out[target] = parts[0]
    return out

"""Single-file checkpoint export (`UCESingleFileMixin`, part of `UCEMixin`): the whole edited pipeline as one
``.safetensors`` file in the original layout that AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` load (the
layout itself: `single_file_layout`)."""

from __future__ import annotations

import json
import os

import torch
from diffusers.utils import logging

from ..utils.files import atomic_save_safetensors, refuse_existing
from ..utils.versions import library_versions
from .lora_kohya import LORA_RECORD_KEY, kohya_title, sai_architecture
from .single_file_layout import (
    SINGLE_FILE_LAYOUTS,
    check_single_file_family,
    component_table,
    single_file_layout,
    single_file_plan,
    single_file_tensors,
)
from .state_mixin import serialized

logger = logging.get_logger(__name__)

SINGLE_FILE_SUFFIX = ".safetensors"
SAI_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # the original code, as sd-scripts writes it


def check_single_file_path(path: str | os.PathLike, overwrite: bool = False) -> str:
    """`path` as a string if a single-file checkpoint may be written there: a file name ending in ``.safetensors``,
    not a folder, in a folder (or where one can be made), new unless `overwrite`. Raises `ValueError` (or
    `FileExistsError`, naming `overwrite=True`) otherwise; writes nothing."""
    path = os.fspath(path)
    name = os.path.basename(path) if isinstance(path, str) else ""
    if not name.endswith(SINGLE_FILE_SUFFIX) or name == SINGLE_FILE_SUFFIX:
        raise ValueError(f"path must be a file name ending in '{SINGLE_FILE_SUFFIX}' (single-file checkpoints are "
                         f"written as safetensors only), got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give the path of the file to write")
    folder = os.path.dirname(path)
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file, not a folder to write {name} into")
    refuse_existing(path, overwrite, "choose another path")
    return path


class UCESingleFileMixin:
    """`save_single_file`: the edited pipeline as one original-layout checkpoint (part of `UCEMixin`)."""

    @serialized
    def save_single_file(self, path: str | os.PathLike, *, overwrite: bool = False, dtype: torch.dtype | None = None,
                         fuse_concept_edits: bool = False) -> str:
        r"""Save the whole pipeline (UNet, VAE and text encoders) as one `.safetensors` checkpoint in the original
        Stable Diffusion layout, the file AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` load.

        The keys are those of the original checkpoints: SD 1.x ``model.diffusion_model.*``,
        ``first_stage_model.*`` and ``cond_stage_model.transformer.*``; SD 2.x its OpenCLIP text encoder under
        ``cond_stage_model.model.*``; SDXL ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L) and
        ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, with ``text_projection``). A pipeline whose text
        encoder is OpenCLIP is written as SD 2.x. Every weight keeps its value (and dtype, unless `dtype` is given),
        so the file loads back to the edited pipeline exactly. The file holds weights only: when loading it with
        diffusers, pass the pipeline's folder or Hub id as `config` for the schedulers, tokenizers and model
        settings (for SD 2.x 768-v, the v-prediction scheduler); AUTOMATIC1111 and ComfyUI detect them.

        As for `save_pretrained`, an edit is only written once fused: unfused concept edits are refused (or fused
        first with `fuse_concept_edits=True`), so an edit is never silently dropped. A pipeline without edits is
        written as it is. Stable Diffusion 1.x/2.x and SDXL only; everything (family, path, weights) is checked
        before the pipeline changes or anything is written, and the file is written atomically.

        Args:
            path (`str` or `os.PathLike`): the file to write, ending in `.safetensors` (its folder is created if
                needed).
            overwrite (`bool`, defaults to `False`): replace an existing file; otherwise an existing `path` is a
                `FileExistsError`.
            dtype (`torch.dtype`, *optional*): cast floating-point weights to this dtype (e.g. `torch.float16` for a
                half-size file); each component's own dtype by default.
            fuse_concept_edits (`bool`, defaults to `False`): fuse applied edits first instead of refusing.

        Returns:
            `str`: the path written.

        Example:
        ```py
        >>> pipe = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4"))
        >>> pipe.apply_concept_edits(erase=["Van Gogh"], guide="art")
        >>> pipe.fuse_concept_edits()
        >>> pipe.save_single_file("./sd14-no-van-gogh.safetensors", dtype=torch.float16)
        >>> # plain diffusers, no plugin: `config` gives what the file does not hold (scheduler, tokenizer)
        >>> plain = StableDiffusionPipeline.from_single_file(
        ...     "./sd14-no-van-gogh.safetensors", config="CompVis/stable-diffusion-v1-4")
        ```
        """
        path = check_single_file_path(path, overwrite)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
        layout = self._uce_single_file_layout()
        parts = SINGLE_FILE_LAYOUTS[layout]
        plans = []  # from the keys alone: a weight with no place is refused before the pipeline changes
        for component, prefix, kind in parts:
            model = getattr(self, component)
            state = model.state_dict()  # views of the parameters: fusing below writes into them in place
            plans.append((single_file_plan(component_table(kind, model.config, list(state)), list(state), prefix),
                          state))
        self._uce_require_fused(fuse_concept_edits, "save")
        tensors = {}
        for plan, state in plans:
            tensors.update(single_file_tensors(plan, state))
        folder, name = os.path.split(path)
        # streamed tensor by tensor (cast as it goes), every weight checked finite after the cast before writing
        atomic_save_safetensors(tensors, folder or ".", name, self._uce_single_file_metadata(layout, name),
                                overwrite=overwrite, dtype=dtype)
        fused = f", {len(self.concept_edits)} concept edit(s) fused" if self.concept_edits else ""
        logger.info(f"Saved the pipeline as one {layout} checkpoint ({len(tensors)} tensors{fused}) to {path}")
        return path

    def _uce_single_file_layout(self) -> str:
        """The layout this pipeline is written in (`single_file_layout`), after checking it has every component."""
        layouts = check_single_file_family(self._uce_family.name)
        components = {c for layout in layouts for c, _, _ in SINGLE_FILE_LAYOUTS[layout]}
        missing = sorted(c for c in components if getattr(self, c, None) is None)
        if missing:
            raise ValueError(f"a single-file checkpoint holds the UNet, the VAE and the text encoder(s), but this "
                             f"pipeline has no {', '.join(missing)}")
        acts = {c: getattr(getattr(self, c).config, "hidden_act", None) for c in components if c.startswith("text")}
        return single_file_layout(self._uce_family.name, acts)

    def _uce_single_file_metadata(self, layout: str, name: str) -> dict[str, str]:
        """The file's header: the SAI model spec that AUTOMATIC1111 and ComfyUI show, and the edits."""
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        records = self.concept_edits
        metadata = {
            "format": "pt",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": sai_architecture(layout, prediction_type),
            "modelspec.implementation": SAI_IMPLEMENTATION,
            "modelspec.title": kohya_title(records) if records else name[:-len(SINGLE_FILE_SUFFIX)],
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        }
        size = self.unet.config.sample_size
        if isinstance(size, int) and isinstance(getattr(self, "vae_scale_factor", None), int):
            metadata["modelspec.resolution"] = f"{size * self.vae_scale_factor}x{size * self.vae_scale_factor}"
        metadata[LORA_RECORD_KEY] = json.dumps({
            "edits": [r.to_dict() for r in records], "scale": self.concept_edit_scale, "layout": layout,
            "base_model": self._uce_base_info(None), "versions": library_versions(),
        })
        return metadata

"""Saving and loading concept edits as edit files (`UCEIOMixin`, part of `UCEMixin`): one small safetensors file
that any pipeline of the same base model loads without solving again (the format: `edit_format`)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from diffusers.utils import logging

from ..utils.checks import check_base_model, check_license
from ..utils.files import atomic_save_safetensors, check_weight_name
from ..utils.folders import atomic_folder
from ..utils.versions import library_versions
from .edit_format import (
    EDIT_WEIGHT_NAME,
    FORMAT_NAME,
    METADATA_KEY,
    VERIFY_TOLERANCE,
    format_version,
    read_edit_file,
    records_from,
    resolve_edit_file,
    solution_difference,
    solution_from,
    solution_tensors,
)
from .edit_state import EditState
from .state_mixin import serialized

logger = logging.get_logger(__name__)

def _describe(info: dict) -> str:
    """A model as an edit file's ``base_model`` entry (or `_uce_base_info`) describes it, for error messages."""
    widths = info.get("text_hidden_sizes") or {"unet": info.get("text_hidden_size")}
    width = (f"text hidden size {next(iter(widths.values()))}" if len(widths) == 1 else
             "text hidden sizes " + ", ".join(f"{w} ({name})" for name, w in widths.items()))
    attention = info.get("cross_attention_modules")
    attention = f", {attention} cross-attention modules" if attention else ""
    return f"{info.get('name_or_path') or 'an unnamed model'} ({info.get('pipeline_class')}, {width}{attention})"


class UCEIOMixin:
    """`save_concept_edits` / `load_concept_edits`: edit files (part of `UCEMixin`)."""

    @serialized
    def save_concept_edits(
        self, save_directory: str | os.PathLike, *, weight_name: str = EDIT_WEIGHT_NAME, overwrite: bool = False,
        write_model_card: bool = True, overwrite_model_card: bool = False, base_model: str | None = None,
        license: str | None = None,
    ) -> str:
        r"""Save the applied concept edit (solution, records, strength, report) as one safetensors file.

        The file holds each target group's d×d transform in float64 (4.7 MB for SD 1.5, 34 MB for SDXL, 134 MB for
        FLUX, whose T5 states are 4096 wide), far less than the model, and `load_concept_edits` installs it on any
        pipeline of the same base model without solving again.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write into (created if needed).
            weight_name (`str`, defaults to `"uce_edits.safetensors"`): the file name; must end in `.safetensors`.
            overwrite (`bool`, defaults to `False`): replace an existing file of that name.
            write_model_card (`bool`, defaults to `True`): also write a `README.md` model card (`base_model_relation:
                adapter`) that records every edit; with the installed plugin only (the single-file community pipeline
                writes none).
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the folder (it is
                kept otherwise, unless it is a card diffusers-uce wrote and nobody edited since).
            base_model (`str`, *optional*): the Hub id of the base model (`"owner/name"`) for the card's metadata, when
                the pipeline was loaded from a local folder; by default the pipeline's `name_or_path` when it is a Hub
                id.
            license (`str`, *optional*): the licence id for the card's metadata; by default the base model's when it
                is a well-known model.

        Returns:
            `str`: the path of the file written.

        Example:
        ```py
        >>> pipe.apply_concept_edits(erase=["Van Gogh"], guide="art")
        >>> pipe.save_concept_edits("./van-gogh-erased")
        >>> other = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4"))
        >>> other.load_concept_edits("./van-gogh-erased")
        ```
        """
        state = self._uce_require_state("save")
        check_weight_name(weight_name)
        card = {"base_model": check_base_model(base_model), "license": check_license(license)}
        tensors = {}
        for group in state.groups:
            tensors.update(solution_tensors(f"{group.group.name}.uce", group.solution))
        info = {
            "format": FORMAT_NAME,
            "format_version": format_version([g.solution for g in state.groups]),
            "denoiser": self._uce_layout().groups[0].component,
            "projections": [{"group": g.group.name, "name": p.name, "shape": list(p.module.weight.shape)}
                            for g in state.groups for p in g.projections],
            **self._uce_saved_record(state),
        }
        # the edit file and its card as one unit: written into a copy of the folder, which then replaces it in one step
        with atomic_folder(save_directory, update=True) as folder:
            atomic_save_safetensors(tensors, folder, weight_name, {"format": "pt", METADATA_KEY: json.dumps(info)},
                                    overwrite=overwrite)
            if write_model_card:
                self._uce_write_model_card(folder, "adapter", overwrite=overwrite_model_card, **card)
        path = os.path.join(os.fspath(save_directory), weight_name)
        logger.info(f"Saved {len(state.records)} concept edit(s) to {path}")
        return path

    @serialized
    def load_concept_edits(
        self, pretrained_model_name_or_path: str | os.PathLike, *, weight_name: str | None = None,
        subfolder: str | None = None, revision: str | None = None, token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, force_download: bool = False,
        verify: bool = True, adapter_name: str | None = None,
    ) -> None:
        r"""Load an edit file written by `save_concept_edits` and install it (processor mode, its saved strength).

        Everything is checked before the pipeline changes: the file format, that this pipeline is of the file's family
        (a Stable Diffusion file does not load onto SDXL or FLUX, nor the reverse) with the same text hidden sizes,
        and has every stored layer with the stored shape. The stored solution is installed as is, so the loaded edit
        reproduces the saved one exactly; `fuse_concept_edits`, `set_concept_edit_scale` and further
        `apply_concept_edits` calls work as after `apply_concept_edits`. Files of format version 1 (Stable Diffusion
        1.x/2.x, before pipeline families) load too.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a `.safetensors` file, a folder holding one, or a
                Hub repo id.
            weight_name (`str`, *optional*): the file name in the folder or repo (defaults to
                `"uce_edits.safetensors"`; in a local folder, the only edit file there when that name is absent).
            subfolder (`str`, *optional*): folder inside the repo or local folder.
            revision (`str`, *optional*): Hub branch, tag or commit.
            token (`str` or `bool`, *optional*): Hub token.
            cache_dir (`str` or `os.PathLike`, *optional*): Hub cache folder.
            local_files_only (`bool`, defaults to `False`): only use the local Hub cache.
            force_download (`bool`, defaults to `False`): download again even if cached.
            verify (`bool`, defaults to `True`): re-encode the recorded prompts on this pipeline, solve them again and
                refuse the file when its stored edit differs from what its records describe (a renamed concept, a
                tampered transform, another base model), or when its strength is 0 or negative (the edit disabled or
                reversed); a strength other than 1 is loaded with a warning. `False` skips this (it costs one
                solve).
            adapter_name (`str`, *optional*): the name of the loaded edits (`remove_concept_edits`); by default the
                names they were saved with.

        Example:
        ```py
        >>> pipe = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4"))
        >>> pipe.load_concept_edits("./van-gogh-erased")
        >>> pipe.fuse_concept_edits()
        ```
        """
        if self._uce_state is not None:
            raise ValueError("this pipeline already has concept edits; call unload_concept_edits() first, then "
                             "load_concept_edits() (or apply the new concepts with apply_concept_edits())")
        path = resolve_edit_file(pretrained_model_name_or_path, weight_name=weight_name, subfolder=subfolder,
                                 revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, force_download=force_download)
        info, tensors = read_edit_file(path)
        groups, records, solutions = self._uce_validate_edit_file(info, tensors, path)
        scale = float(info["scale"])
        if verify:
            if scale <= 0:  # the records cannot vouch for a strength that disables or reverses them
                effect = "disables it" if scale == 0 else "reverses it (its erased concepts come back stronger)"
                raise ValueError(f"the edit file {path} applies its edit at strength {scale:g}, which {effect}: "
                                 "not the edit its records describe. load_concept_edits(..., verify=False) loads it "
                                 "anyway")
            self._uce_verify_edit_file(groups, records, solutions, path)
            if scale != 1:
                logger.warning(f"the edit file {path} applies its edit at strength {scale:g} (1 is the edit its "
                               "records describe): call set_concept_edit_scale(1.0) for the full edit")
        device = self._execution_device
        if adapter_name is not None:  # (the pipeline has no edits here: any valid name is new)
            name = self._uce_new_name(adapter_name)
            records = [replace(r, name=name) for r in records]
        groups[0].state.scale = scale  # checked with the solutions before anything is installed
        self._uce_set_edit(groups, records, [s.to(device=device) for s in solutions])
        logger.info(f"Loaded {len(records)} concept edit(s) on {len(info['projections'])} layers from {path}")

    def _uce_verify_edit_file(self, groups, records, solutions, path) -> None:
        """Solve the file's records again on this pipeline and compare with the stored solutions (changes nothing)."""
        solved, _, _ = self._uce_solutions(records, groups, held=[], report=False)
        for group, stored, fresh in zip(groups, solutions, solved):
            difference = solution_difference(stored, fresh, len(group.projections))
            if difference > VERIFY_TOLERANCE:
                summary = "; ".join(f"erase {list(r.erase)}" if r.erase else f"debias {[t.concept for t in r.debias]}"
                                    for r in records)
                raise ValueError(
                    f"the edit file {path} does not perform the edits it records ({summary}): solving them again on "
                    f"this pipeline changes {group.group.name} differently from the stored edit (relative difference "
                    f"{difference:.2g}). The file was changed after it was saved, or made from another model; "
                    "load_concept_edits(..., verify=False) loads it anyway")

    def _uce_saved_record(self, state) -> dict:
        """What every saved file of an edit (edit file, LoRA export) records about it, enough to write its model card
        again: family, records, shared options, strength, base model, report and library versions."""
        layers = state.layers
        if callable(layers):  # store what it selected: attention names, which select the same modules as substrings
            layers = list(dict.fromkeys(p.attention for p in state.projections))
        elif layers is not None:
            layers = list(layers)
        return {
            "family": self._uce_family.name,
            "edits": [r.to_dict() for r in state.records],
            "edit_keys": bool(state.edit_keys),
            "layers": layers,
            "scale": state.scale,
            "base_model": self._uce_base_info(len(state.projections)),
            "report": None if state.report is None else state.report.to_dict(),
            "versions": library_versions(),
        }

    def _uce_base_info(self, num_projections: int | None) -> dict:
        name = getattr(self, "name_or_path", None) or getattr(self.config, "_name_or_path", None)
        family = self._uce_layout()
        widths = {g.name: g.text_width(self) for g in family.groups}
        return {
            "name_or_path": str(name) if name else None,
            "pipeline_class": self._uce_base_class().__name__,
            "family": family.name,
            "text_hidden_size": widths[family.groups[0].name],
            "text_hidden_sizes": widths,
            "cross_attention_modules": sum(1 for g in family.groups if g.cross_attention for n, _ in
                                           getattr(self, g.component).named_modules() if n.endswith("attn2")),
            "num_projections": num_projections,
        }

    def _uce_validate_edit_file(self, info: dict, tensors: dict, path: str):
        """Check a read edit file against this pipeline; return (groups, records, solutions). Changes nothing."""
        family, stored_base, here = self._uce_layout(), info["base_model"], self._uce_base_info(None)
        mismatch = (f"the edit file {path} was saved from {_describe(stored_base)}, but this pipeline is "
                    f"{_describe(here)}: load it onto the base model it was made for")
        first = family.groups[0].name  # version-1 files: Stable Diffusion 1.x/2.x, one group
        stored_widths = stored_base.get("text_hidden_sizes") or {first: stored_base["text_hidden_size"]}
        if (info.get("family", "stable-diffusion") != family.name or info["denoiser"] != family.groups[0].component
                or any(here["text_hidden_sizes"].get(name) != width for name, width in stored_widths.items())):
            raise ValueError(mismatch)
        stored = [(entry.get("group", first), entry["name"]) for entry in info["projections"]]
        by_name = {g.name: g for g in family.groups}
        for (group, name), entry in zip(stored, info["projections"]):
            if group not in by_name:
                raise ValueError(f"{mismatch} (it edits layers of {group!r}, not a group of this family)")
            try:
                weight = getattr(getattr(self, by_name[group].component).get_submodule(name), "weight", None)
            except AttributeError:
                raise ValueError(f"{mismatch} (it has no layer {name})") from None
            shape = None if weight is None else list(weight.shape)
            if shape != list(entry["shape"]):
                raise ValueError(f"{mismatch} ({name} has shape {shape}, the file says {entry['shape']})")
        layers = None if info["layers"] is None else list(info["layers"])
        groups = self._uce_groups(EditState(info["edit_keys"], layers))
        if [(g.group.name, p.name) for g in groups for p in g.projections] != stored:
            raise ValueError(f"{mismatch} (the stored edit_keys/layers select other layers here)")
        records = records_from(info["edits"])
        widths = here["text_hidden_sizes"]
        solutions = [solution_from(tensors, f"{g.group.name}.uce", widths[g.group.name] + g.biased,
                                   len(g.projections), records) for g in groups]
        prefixes = tuple(f"{g.group.name}.uce." for g in groups)
        extra = [k for k in tensors if not k.startswith(prefixes)]
        if extra:
            raise ValueError(f"the edit file has unexpected tensors: {', '.join(sorted(extra))}")
        return groups, records, solutions

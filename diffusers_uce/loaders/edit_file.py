"""The edit-file format: what `save_concept_edits` writes and `load_concept_edits` reads, checked before any use.

An edit file is one safetensors file. Its tensors are the solution of every target group in float64, keyed by group
name: ``<group>.uce.transform`` (``d×d``; ``(d+1)×(d+1)`` in homogeneous form for a group whose layers have a bias,
FLUX) and, for the "tensor" technique, ``<group>.uce.correction.{tokens,solved,coef}``. Group names are
``"unet"`` (SD 1.x/2.x, SDXL), ``"transformer.context_embedder"`` and ``"transformer.text_embedder"`` (FLUX). Its
header
holds one JSON string (metadata key ``"uce"``): format name and version, the family, the edit records, the edited
projections with their group and shape, the options every later edit must share, the strength, the base model and
library versions. Version 1 (before families) wrote SD 1.x/2.x files without ``"family"`` or per-projection
``"group"``; they still load. Version 3 adds precise erasure (``method="speed"``): its solution is stored as the
per-layer factors ``<group>.uce.layerwise.up`` (``m×d``) and ``<group>.uce.layerwise.down`` (``L×m×d``, or ``1×m×d``
without prior refinement) of ``T_ℓ = I + upᵀ down_ℓ``, and no transform.
"""

from __future__ import annotations

import json
import os

import safetensors
import safetensors.torch
import torch
from diffusers.utils import logging

from ..core import engine
from ..core.edits import ConceptEdit
from ..core.layerwise import Layerwise
from ..core.solve import Correction
from ..utils.checks import is_finite_number
from ..utils.files import PICKLE_SUFFIXES, atomic_save_safetensors, check_weight_name
from ..utils.versions import library_versions
from .edit_state import EditState

logger = logging.get_logger(__name__)

FORMAT_NAME = "diffusers-uce-edit"
FORMAT_VERSION = 3  # 3: precise erasure's per-layer factors; 2: a family and one solution per target group (FLUX has
# two); 1: SD 1.x/2.x, one group
METADATA_KEY = "uce"
EDIT_WEIGHT_NAME = "uce_edits.safetensors"
CORRECTION_PARTS = ("tokens", "solved", "coef")


def solution_tensors(prefix: str, solution: engine.Solution) -> dict[str, torch.Tensor]:
    """The tensors of one group's solution, in float64 on the CPU: ``<prefix>.transform`` (and the correction)."""
    solution = solution.to(device="cpu", dtype=torch.float64)
    if solution.layerwise is not None:
        return {f"{prefix}.layerwise.up": solution.layerwise.up, f"{prefix}.layerwise.down": solution.layerwise.down}
    tensors = {f"{prefix}.transform": solution.transform}
    if solution.correction is not None:
        tensors.update({f"{prefix}.correction.{p}": getattr(solution.correction, p) for p in CORRECTION_PARTS})
    return tensors


def records_from(raw) -> list[ConceptEdit]:
    """Rebuild and re-validate stored edit records (each against the ones before it)."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("the edit file lists no edit records")
    records = []
    for entry in raw:
        try:
            records.append(ConceptEdit.from_dict(entry, earlier=records))
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid edit record in the edit file ({error}): {entry!r}") from error
    return records


def resolve_edit_file(name_or_path, *, weight_name, subfolder, revision, token, cache_dir, local_files_only,
                      force_download) -> str:
    """A local path to the edit file: the file itself, the one in a folder, or a Hub download (the arguments of
    `load_concept_edits`). Pickle files are refused by name, before anything is opened or downloaded."""
    name_or_path = os.fspath(name_or_path)
    if weight_name is not None:
        _refuse_pickle(weight_name)
    if os.path.isfile(name_or_path) or name_or_path.lower().endswith(PICKLE_SUFFIXES):
        _refuse_pickle(name_or_path)
        return name_or_path
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
        if weight_name is not None:
            path = os.path.join(folder, weight_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {weight_name} in {folder}")
            return path
        if os.path.isfile(os.path.join(folder, EDIT_WEIGHT_NAME)):
            return os.path.join(folder, EDIT_WEIGHT_NAME)
        candidates = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and _is_edit_file(
            os.path.join(folder, f)))
        if len(candidates) != 1:
            found = f"several ({', '.join(candidates)})" if candidates else "none"
            raise FileNotFoundError(f"looked for one concept-edit .safetensors file in {folder} and found {found}: "
                                    "pass weight_name")
        return os.path.join(folder, candidates[0])
    if name_or_path.endswith(".safetensors") or name_or_path.startswith((".", "~", os.sep)) or os.path.isabs(
            name_or_path):
        raise FileNotFoundError(f"{name_or_path} does not exist (give an edit file, a folder or a Hub repo id)")
    from huggingface_hub import hf_hub_download

    logger.info(f"{name_or_path} is not a local file or folder: downloading it from the Hub")
    return hf_hub_download(
        name_or_path, weight_name or EDIT_WEIGHT_NAME, subfolder=subfolder, revision=revision, token=token,
        cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download,
    )


def _refuse_pickle(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES) or not name.endswith(".safetensors"):
        raise ValueError(f"{name} is not a .safetensors file: only safetensors edit files are loaded (pickle files "
                         "can run code when loaded and are never opened)")


def _is_edit_file(path: str) -> bool:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # not a readable safetensors file: not ours
        return False


def read_edit_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata JSON (its format and types checked, not yet against a pipeline) and the tensors of an edit file."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if METADATA_KEY not in header:
        lora = any(".lora_" in k for k in tensors)
        hint = " (it looks like a LoRA: load it with load_lora_weights())" if lora else ""
        raise ValueError(f"{path} is not a diffusers-uce edit file: its header has no {METADATA_KEY!r} metadata{hint}")
    try:
        info = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"the {METADATA_KEY!r} metadata of {path} is not valid JSON: {error}") from error
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT_NAME:
        raise ValueError(f"{path} is not a diffusers-uce edit file (format {found!r}, expected {FORMAT_NAME!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{path} has edit-file format version {version!r}; this diffusers-uce reads versions up to "
                         f"{FORMAT_VERSION}: upgrade diffusers-uce")
    required = ("denoiser", "edits", "projections", "edit_keys", "layers", "scale", "base_model")
    missing = [k for k in required if k not in info]
    if missing:
        raise ValueError(f"the metadata of {path} misses {', '.join(missing)}")
    layers, projections, base = info["layers"], info["projections"], info["base_model"]
    if version >= 2 and not (isinstance(info.get("family"), str) and isinstance(projections, list) and all(
            isinstance(p, dict) and isinstance(p.get("group"), str) for p in projections)):
        raise ValueError(f"the metadata of {path} (format version {version}) misses the family or a projection's "
                         "group")
    widths = base.get("text_hidden_sizes", {}) if isinstance(base, dict) else None
    valid = (
        isinstance(info["edit_keys"], bool)
        and (layers is None or (isinstance(layers, list) and all(isinstance(x, str) for x in layers)))
        and isinstance(projections, list) and len(projections) > 0
        and all(isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
                for p in projections)
        and isinstance(base, dict) and isinstance(base.get("text_hidden_size"), int)
        and isinstance(widths, dict) and all(isinstance(w, int) for w in widths.values())
    )
    if not valid:
        raise ValueError(f"the metadata of {path} has invalid edit_keys, layers, projections or base_model")
    scale = info["scale"]
    if not is_finite_number(scale):
        raise ValueError(f"the metadata of {path} has an invalid scale {scale!r}")
    return info, tensors


def solution_from(tensors: dict, prefix: str, d: int, num_layers: int, records: list[ConceptEdit]) -> engine.Solution:
    """Rebuild one group's stored solution, checking every shape against what this pipeline expects.

    Args:
        tensors (`dict[str, torch.Tensor]`): every tensor of the file.
        prefix (`str`): ``"<group name>.uce"``.
        d (`int`): the transform's size: the text width, plus one for a group with a bias.
        num_layers (`int`): the group's number of edited layers (rows of the correction coefficients).
        records (`list[ConceptEdit]`): the stored edit records ("tensor" technique ones need the correction).
    """
    if records[-1].method == "speed":
        return _layerwise_from(tensors, prefix, d, num_layers)
    transform = tensors.get(f"{prefix}.transform")
    if transform is None or tuple(transform.shape) != (d, d) or not transform.is_floating_point():
        raise ValueError(f"the edit file's {prefix}.transform is missing or is not a {d}x{d} float tensor")
    parts = {p: tensors.get(f"{prefix}.correction.{p}") for p in CORRECTION_PARTS}
    wants_correction = any(r.technique == "tensor" for r in records)
    correction = None
    if wants_correction:
        if any(t is None for t in parts.values()):
            raise ValueError("the edit file has 'tensor' technique edits but no complete correction tensors")
        r = parts["tokens"].shape[0]
        shapes = {"tokens": (r, d), "solved": (r, d), "coef": (num_layers, r)}
        if any(tuple(parts[p].shape) != shape or not parts[p].is_floating_point() for p, shape in shapes.items()):
            raise ValueError("the edit file's correction tensors have inconsistent shapes")
        correction = Correction(**{p: parts[p].to(torch.float64) for p in CORRECTION_PARTS})
    elif any(t is not None for t in parts.values()):
        raise ValueError("the edit file has correction tensors but no 'tensor' technique edit")
    known = {f"{prefix}.transform"} | {f"{prefix}.correction.{p}" for p in CORRECTION_PARTS}
    extra = [k for k in tensors if k.startswith(prefix + ".") and k not in known]
    if extra:
        raise ValueError(f"the edit file has unexpected tensors: {', '.join(sorted(extra))}")
    solution = engine.Solution(transform.to(torch.float64), correction)
    if not solution.is_finite():
        raise ValueError("the edit file's solution has non-finite values")
    return solution


def _layerwise_from(tensors: dict, prefix: str, d: int, num_layers: int) -> engine.Solution:
    """A stored precise-erasure solution, its shapes checked: ``up`` (m, d) and ``down`` (L or 1, m, d)."""
    up, down = tensors.get(f"{prefix}.layerwise.up"), tensors.get(f"{prefix}.layerwise.down")
    if up is None or down is None or up.dim() != 2 or down.dim() != 3 or up.shape[1] != d or down.shape[
            0] not in (1, num_layers) or tuple(down.shape[1:]) != tuple(up.shape) or not up.is_floating_point():
        raise ValueError(f"the edit file's {prefix}.layerwise factors are missing or are not (m, {d}) and "
                         f"({num_layers} or 1, m, {d}) float tensors")
    extra = [k for k in tensors if k.startswith(prefix + ".") and k not in (f"{prefix}.layerwise.up",
                                                                            f"{prefix}.layerwise.down")]
    if extra:
        raise ValueError(f"the edit file has unexpected tensors: {', '.join(sorted(extra))}")
    solution = engine.Solution(torch.eye(d, dtype=torch.float64), None,
                               layerwise=Layerwise(up.to(torch.float64), down.to(torch.float64)))
    if not solution.is_finite():
        raise ValueError("the edit file's solution has non-finite values")
    return solution


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

    def save_concept_edits(
        self, save_directory: str | os.PathLike, *, weight_name: str = EDIT_WEIGHT_NAME, overwrite: bool = False,
        write_model_card: bool = True, overwrite_model_card: bool = False,
    ) -> str:
        r"""Save the applied concept edit (solution, records, strength) as one safetensors file.

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
                kept otherwise).

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
        tensors = {}
        for group in state.groups:
            tensors.update(solution_tensors(f"{group.group.name}.uce", group.solution))
        layers = state.layers
        if callable(layers):  # store what it selected: attention names, which select the same modules as substrings
            layers = list(dict.fromkeys(p.attention for p in state.projections))
        elif layers is not None:
            layers = list(layers)
        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "denoiser": self._uce_family.groups[0].component,
            "family": self._uce_family.name,
            "edits": [r.to_dict() for r in state.records],
            "projections": [{"group": g.group.name, "name": p.name, "shape": list(p.module.weight.shape)}
                            for g in state.groups for p in g.projections],
            "edit_keys": bool(state.edit_keys),
            "layers": layers,
            "scale": state.scale,
            "base_model": self._uce_base_info(len(state.projections)),
            "versions": library_versions(),
        }
        path = atomic_save_safetensors(tensors, save_directory, weight_name,
                                       {"format": "pt", METADATA_KEY: json.dumps(info)}, overwrite=overwrite)
        logger.info(f"Saved {len(state.records)} concept edit(s) to {path}")
        if write_model_card:
            self._uce_write_model_card(save_directory, "adapter", overwrite=overwrite_model_card,
            weight_name=weight_name)
        return path

    def load_concept_edits(
        self, pretrained_model_name_or_path: str | os.PathLike, *, weight_name: str | None = None,
        subfolder: str | None = None, revision: str | None = None, token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, force_download: bool = False,
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
        device = self._execution_device
        self._uce_set_edit(groups, records, [s.to(device=device) for s in solutions])
        self._uce_state.scale = float(info["scale"])
        logger.info(f"Loaded {len(records)} concept edit(s) on {len(info['projections'])} layers from {path}")

    def _uce_base_info(self, num_projections: int | None) -> dict:
        name = getattr(self, "name_or_path", None) or getattr(self.config, "_name_or_path", None)
        family = self._uce_family
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
        family, stored_base, here = self._uce_family, info["base_model"], self._uce_base_info(None)
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

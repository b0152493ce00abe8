"""Edit files: save a solved concept edit as one small safetensors file and load it onto another pipeline.

A file holds the solution (the shared transform ``T`` and, for the "tensor" technique, the per-layer correction),
keyed by component (``unet.uce.transform``...), and one JSON string in the safetensors header (metadata key
``"uce"``) with the edit records, the edited projections and their shapes, the options every later edit must share,
the strength, the base model and library versions. Loading installs the stored solution as it was (no re-solve).
"""

from __future__ import annotations

import json
import math
import os
from importlib import metadata as importlib_metadata

import safetensors
import safetensors.torch
import torch
from diffusers.utils import logging

from . import engine
from .edits import ConceptEdit
from .files import atomic_path
from .solve import Correction
from .targets import find_projections

logger = logging.get_logger(__name__)

FORMAT_NAME = "diffusers-uce-edit"
FORMAT_VERSION = 1
METADATA_KEY = "uce"
EDIT_WEIGHT_NAME = "uce_edits.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CORRECTION_PARTS = ("tokens", "solved", "coef")


def check_weight_name(weight_name: str) -> str:
    """Validate a file name to write: a plain name ending in ``.safetensors``."""
    if not isinstance(weight_name, str) or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end in '.safetensors' (only safetensors files are written), got "
                         f"{weight_name!r}")
    if os.path.basename(weight_name) != weight_name or weight_name in (".safetensors",):
        raise ValueError(f"weight_name must be a file name such as 'uce_edits.safetensors', got {weight_name!r}: "
                         "put folders in save_directory")
    return weight_name


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], save_directory: str | os.PathLike, weight_name: str,
    metadata: dict[str, str], overwrite: bool = False,
) -> str:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync, then `os.replace`.

    A failure leaves neither a partial file nor the temporary file, and an existing file is only replaced when
    `overwrite` is `True`.

    Args:
        tensors (`dict[str, torch.Tensor]`): the tensors to write.
        save_directory (`str` or `os.PathLike`): the folder, created if needed.
        weight_name (`str`): the file name (ends in ``.safetensors``).
        metadata (`dict[str, str]`): the safetensors header metadata.
        overwrite (`bool`, defaults to `False`): replace an existing file.

    Returns:
        `str`: the path written.
    """
    check_weight_name(weight_name)
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; give a folder to write {weight_name} into")
    path = os.path.join(save_directory, weight_name)

    def refuse_existing():
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} already exists: pass overwrite=True to replace it, or another weight_name")

    refuse_existing()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        refuse_existing()
    return path


def library_versions() -> dict[str, str | None]:
    """Versions of diffusers-uce and the libraries an edit file depends on."""
    out = {}
    for name in ("diffusers-uce", "diffusers", "torch", "transformers"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def _describe(info: dict) -> str:
    return (f"{info.get('name_or_path') or 'an unnamed model'} ({info.get('pipeline_class')}, text hidden size "
            f"{info.get('text_hidden_size')}, {info.get('cross_attention_modules')} cross-attention modules)")


def _records_from(raw) -> list[ConceptEdit]:
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


class UCEIOMixin:
    """`save_concept_edits` / `load_concept_edits`: edit files (part of `UCEMixin`)."""

    def save_concept_edits(
        self, save_directory: str | os.PathLike, *, weight_name: str = EDIT_WEIGHT_NAME, overwrite: bool = False
    ) -> str:
        r"""Save the applied concept edit (solution, records, strength) as one safetensors file.

        The file is small (the d×d transform in float64: 4.7 MB for SD 1.5) and `load_concept_edits` installs it on
        any pipeline of the same base model without solving again.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write into (created if needed).
            weight_name (`str`, defaults to `"uce_edits.safetensors"`): the file name; must end in `.safetensors`.
            overwrite (`bool`, defaults to `False`): replace an existing file of that name.

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
        prefix = f"{self._uce_denoiser_name}.uce"
        solution = state.solution.to(device="cpu", dtype=torch.float64)
        tensors = {f"{prefix}.transform": solution.transform}
        if solution.correction is not None:
            for part in _CORRECTION_PARTS:
                tensors[f"{prefix}.correction.{part}"] = getattr(solution.correction, part)
        layers = state.layers
        if callable(layers):  # store what it selected: attention names, which select the same modules as substrings
            layers = list(dict.fromkeys(p.attention for p in state.projections))
        elif layers is not None:
            layers = list(layers)
        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "denoiser": self._uce_denoiser_name,
            "edits": [r.to_dict() for r in state.records],
            "projections": [{"name": p.name, "shape": list(p.module.weight.shape)} for p in state.projections],
            "edit_keys": bool(state.edit_keys),
            "layers": layers,
            "scale": state.scale,
            "base_model": self._uce_base_info(len(state.projections)),
            "versions": library_versions(),
        }
        path = atomic_save_safetensors(tensors, save_directory, weight_name,
                                       {"format": "pt", METADATA_KEY: json.dumps(info)}, overwrite=overwrite)
        logger.info(f"Saved {len(state.records)} concept edit(s) to {path}")
        return path

    def load_concept_edits(
        self, pretrained_model_name_or_path: str | os.PathLike, *, weight_name: str | None = None,
        subfolder: str | None = None, revision: str | None = None, token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, force_download: bool = False,
    ) -> None:
        r"""Load an edit file written by `save_concept_edits` and install it (processor mode, its saved strength).

        Everything is checked before the pipeline changes: the file format, that this pipeline has every stored
        projection with the stored shape and the same text hidden size. The stored solution is installed as is, so
        the loaded edit reproduces the saved one exactly; `fuse_concept_edits`, `set_concept_edit_scale` and further
        `apply_concept_edits` calls work as after `apply_concept_edits`.

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
        path = _resolve_file(pretrained_model_name_or_path, weight_name=weight_name, subfolder=subfolder,
                             revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                             force_download=force_download)
        info, tensors = _read_edit_file(path)
        projections, records, solution = self._uce_validate_edit_file(info, tensors, path)
        layers = None if info["layers"] is None else list(info["layers"])
        device = self._execution_device
        self._uce_set_edit(projections, info["edit_keys"], layers, records, solution.to(device=device))
        self._uce_state.scale = float(info["scale"])
        logger.info(f"Loaded {len(records)} concept edit(s) on {len(projections)} projections from {path}")

    def _uce_base_info(self, num_projections: int | None) -> dict:
        from .mixin import base_pipeline_class

        name = getattr(self, "name_or_path", None) or getattr(self.config, "_name_or_path", None)
        text_encoder = getattr(self, self._uce_text_encoder_name)
        denoiser = getattr(self, self._uce_denoiser_name)
        return {
            "name_or_path": str(name) if name else None,
            "pipeline_class": base_pipeline_class(type(self)).__name__,
            "text_hidden_size": int(text_encoder.config.hidden_size),
            "cross_attention_modules": sum(1 for n, _ in denoiser.named_modules() if n.endswith("attn2")),
            "num_projections": num_projections,
        }

    def _uce_validate_edit_file(self, info: dict, tensors: dict, path: str):
        """Check a read edit file against this pipeline; return (projections, records, solution). Changes nothing."""
        stored_base = info["base_model"]
        d = stored_base.get("text_hidden_size")
        denoiser = getattr(self, self._uce_denoiser_name)
        here = self._uce_base_info(None)
        mismatch = (f"the edit file {path} was saved from {_describe(stored_base)}, but this pipeline is "
                    f"{_describe(here)}: load it onto the base model it was made for")
        if d != here["text_hidden_size"] or info.get("denoiser") != self._uce_denoiser_name:
            raise ValueError(mismatch)
        stored = info["projections"]
        for entry in stored:
            try:
                module = denoiser.get_submodule(entry["name"])
            except AttributeError:
                raise ValueError(f"{mismatch} (it has no projection {entry['name']})") from None
            shape = list(getattr(module, "weight", torch.empty(0)).shape)
            if shape != list(entry["shape"]):
                raise ValueError(f"{mismatch} ({entry['name']} has shape {shape}, the file says {entry['shape']})")
        layers = None if info["layers"] is None else list(info["layers"])
        projections = find_projections(denoiser, edit_keys=info["edit_keys"], layers=layers, context_dim=d)
        if [p.name for p in projections] != [e["name"] for e in stored]:
            raise ValueError(f"{mismatch} (the stored edit_keys/layers select other projections here)")
        records = _records_from(info["edits"])
        solution = _solution_from(tensors, f"{self._uce_denoiser_name}.uce", d, len(projections), records)
        return projections, records, solution


def _resolve_file(name_or_path, *, weight_name, subfolder, revision, token, cache_dir, local_files_only,
                  force_download) -> str:
    """A local path to the edit file: the file itself, the one in a folder, or a Hub download."""
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


def _read_edit_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata JSON (format-checked) and the tensors of an edit file."""
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
    valid = (
        isinstance(info["edit_keys"], bool)
        and (layers is None or (isinstance(layers, list) and all(isinstance(x, str) for x in layers)))
        and isinstance(projections, list) and len(projections) > 0
        and all(isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
                for p in projections)
        and isinstance(base, dict) and isinstance(base.get("text_hidden_size"), int)
    )
    if not valid:
        raise ValueError(f"the metadata of {path} has invalid edit_keys, layers, projections or base_model")
    scale = info["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the metadata of {path} has an invalid scale {scale!r}")
    return info, tensors


def _solution_from(tensors: dict, prefix: str, d: int, num_layers: int, records: list[ConceptEdit]) -> engine.Solution:
    """Rebuild the stored solution, checking every shape against the metadata."""
    transform = tensors.get(f"{prefix}.transform")
    if transform is None or tuple(transform.shape) != (d, d) or not transform.is_floating_point():
        raise ValueError(f"the edit file's {prefix}.transform is missing or is not a {d}x{d} float tensor")
    parts = {p: tensors.get(f"{prefix}.correction.{p}") for p in _CORRECTION_PARTS}
    wants_correction = any(r.technique == "tensor" for r in records)
    correction = None
    if wants_correction:
        if any(t is None for t in parts.values()):
            raise ValueError("the edit file has 'tensor' technique edits but no complete correction tensors")
        r = parts["tokens"].shape[0]
        shapes = {"tokens": (r, d), "solved": (r, d), "coef": (num_layers, r)}
        if any(tuple(parts[p].shape) != shape or not parts[p].is_floating_point() for p, shape in shapes.items()):
            raise ValueError("the edit file's correction tensors have inconsistent shapes")
        correction = Correction(**{p: parts[p].to(torch.float64) for p in _CORRECTION_PARTS})
    elif any(t is not None for t in parts.values()):
        raise ValueError("the edit file has correction tensors but no 'tensor' technique edit")
    extra = set(tensors) - {f"{prefix}.transform"} - {f"{prefix}.correction.{p}" for p in _CORRECTION_PARTS}
    if extra:
        raise ValueError(f"the edit file has unexpected tensors: {', '.join(sorted(extra))}")
    solution = engine.Solution(transform.to(torch.float64), correction)
    if not solution.is_finite():
        raise ValueError("the edit file's solution has non-finite values")
    return solution

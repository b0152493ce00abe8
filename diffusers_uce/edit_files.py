"""The edit-file format: what `save_concept_edits` writes and `load_concept_edits` reads, checked before any use.

An edit file is one safetensors file. Its tensors are the solution of every target group in float64, keyed by group
name: ``<group>.uce.transform`` (``d×d``; ``(d+1)×(d+1)`` in homogeneous form for a group whose layers have a bias,
FLUX) and, for the "tensor" technique, ``<group>.uce.correction.{tokens,solved,coef}``. Group names are
``"unet"`` (SD 1.x/2.x, SDXL), ``"transformer.context_embedder"`` and ``"transformer.text_embedder"`` (FLUX). Its header
holds one JSON string (metadata key ``"uce"``): format name and version, the family, the edit records, the edited
projections with their group and shape, the options every later edit must share, the strength, the base model and
library versions. Version 1 (before families) wrote SD 1.x/2.x files without ``"family"`` or per-projection
``"group"``; they still load.
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

logger = logging.get_logger(__name__)

FORMAT_NAME = "diffusers-uce-edit"
FORMAT_VERSION = 2  # 2: a family and one solution per target group (FLUX has two); 1: SD 1.x/2.x, one group
METADATA_KEY = "uce"
EDIT_WEIGHT_NAME = "uce_edits.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CORRECTION_PARTS = ("tokens", "solved", "coef")


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


def solution_tensors(prefix: str, solution: engine.Solution) -> dict[str, torch.Tensor]:
    """The tensors of one group's solution, in float64 on the CPU: ``<prefix>.transform`` (and the correction)."""
    solution = solution.to(device="cpu", dtype=torch.float64)
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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
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

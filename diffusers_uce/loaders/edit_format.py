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
without prior refinement) of ``T_ℓ = I + upᵀ down_ℓ``, and no transform. Version 4 stores the groups solved in
low-rank form (inputs too wide for a d×d transform, FLUX.2, HiDream) the same way, whatever the method: the same two
tensors, and no transform (files without such a group are still written as version 3); files of versions 1 to 3
still load.
"""

from __future__ import annotations

import json
import os

import safetensors
import torch
from diffusers.utils import logging

from ..core import engine
from ..core.edits import ConceptEdit
from ..core.layerwise import Layerwise
from ..core.limits import MAX_EDITS, check_count
from ..core.solve import Correction, apply_to_inputs
from ..utils.checks import is_finite_number
from ..utils.files import PICKLE_SUFFIXES
from .state_mixin import MAX_EDIT_SCALE

logger = logging.get_logger(__name__)

FORMAT_NAME = "diffusers-uce-edit"
FORMAT_VERSION = 4  # 4: wide groups' low-rank solutions as factors; 3: precise erasure's per-layer factors; 2: a
# family and one solution per target group (FLUX has two); 1: SD 1.x/2.x, one group
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


def format_version(solutions: list[engine.Solution]) -> int:
    """The oldest format version that holds `solutions`: 4 with a wide group's low-rank solution, else 3 (so that
    older releases still read every file they can)."""
    return FORMAT_VERSION if any(s.transform is None for s in solutions) else 3


def records_from(raw) -> list[ConceptEdit]:
    """Rebuild and re-validate stored edit records (each against the ones before it)."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("the edit file lists no edit records")
    check_count(len(raw), "the number of edit records in the edit file", MAX_EDITS)
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
            os.path.join(folder, f)))  # (regular files only: a FIFO or device is never opened)
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
    if not os.path.isfile(path):
        return False  # not a regular file (a FIFO would block the read)
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
    except RecursionError:
        raise ValueError(f"the {METADATA_KEY!r} metadata of {path} is nested too deeply for an edit file") from None
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
    if not is_finite_number(scale) or abs(scale) > MAX_EDIT_SCALE:
        raise ValueError(f"the metadata of {path} has an invalid scale {scale!r} (a strength between "
                         f"-{MAX_EDIT_SCALE:g} and {MAX_EDIT_SCALE:g})")
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
    if f"{prefix}.layerwise.up" in tensors:  # a wide group solved in low-rank form (version 4)
        return _layerwise_from(tensors, prefix, d, num_layers, low_rank=True)
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


def _layerwise_from(tensors: dict, prefix: str, d: int, num_layers: int, low_rank: bool = False) -> engine.Solution:
    """A stored precise-erasure solution (or, with `low_rank`, a wide group's low-rank one, which has no transform),
    its shapes checked: ``up`` (m, d) and ``down`` (L or 1, m, d)."""
    up, down = tensors.get(f"{prefix}.layerwise.up"), tensors.get(f"{prefix}.layerwise.down")
    if up is None or down is None or up.dim() != 2 or down.dim() != 3 or up.shape[1] != d or down.shape[
            0] not in (1, num_layers) or tuple(down.shape[1:]) != tuple(up.shape) or not up.is_floating_point():
        raise ValueError(f"the edit file's {prefix}.layerwise factors are missing or are not (m, {d}) and "
                         f"({num_layers} or 1, m, {d}) float tensors")
    extra = [k for k in tensors if k.startswith(prefix + ".") and k not in (f"{prefix}.layerwise.up",
                                                                            f"{prefix}.layerwise.down")]
    if extra:
        raise ValueError(f"the edit file has unexpected tensors: {', '.join(sorted(extra))}")
    solution = engine.Solution(None if low_rank else torch.eye(d, dtype=torch.float64), None,
                               layerwise=Layerwise(up.to(torch.float64), down.to(torch.float64)))
    if not solution.is_finite():
        raise ValueError("the edit file's solution has non-finite values")
    return solution


# Largest relative difference between a stored edit and the same records solved again for the file to be taken as
# describing its edit: far above float32 encodings on other hardware, far below any change of a concept or a scale.
VERIFY_TOLERANCE = 1e-2


def solution_difference(a: engine.Solution, b: engine.Solution, num_layers: int, probes: int = 16) -> float:
    """How differently two solutions change their layers' inputs: ``max_ℓ ‖(T_ℓ^a − T_ℓ^b) X‖ / ‖(T_ℓ^a − I) X‖``
    on seeded random probe inputs ``X`` (the same for both), in float64."""
    a, b = (s.to(device="cpu", dtype=torch.float64) for s in (a, b))
    d = a.transform.shape[-1] if a.transform is not None else a.layerwise.up.shape[-1]
    x = torch.randn(probes, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst = 0.0
    for layer in range(num_layers):  # a few small products per layer: this runs once per loaded file
        change_a, change_b = (apply_to_inputs(x, _delta(s), s.correction, layer, s.layerwise) - x for s in (a, b))
        scale = float(change_a.norm()) or 1.0
        worst = max(worst, float((change_a - change_b).norm()) / scale)
    return worst


def _delta(solution: engine.Solution) -> torch.Tensor | None:
    if solution.transform is None:  # a low-rank solution: its change is `layerwise`
        return None
    return solution.transform - torch.eye(solution.transform.shape[0], dtype=solution.transform.dtype)

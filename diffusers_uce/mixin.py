"""`UCEMixin`: concept editing methods for diffusers pipelines, and `attach` to add them to a loaded pipeline."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from . import engine
from .concepts import MODERATION_DEFAULTS, erase_requests, resolve_concept_arg
from .edits import ConceptEdit, build_concept_edit
from .io import UCEIOMixin
from .lora import UCELoraMixin
from .processor import ProjectionEdit, UCEAttnProcessor
from .prompts import encode_prompts, preserve_positions
from .report import DEFAULT_HOLDOUT_CONCEPTS, EditReport, build_report
from .solve import edited_weights, grouped_grams, scaled
from .targets import LayerFilter, Projection, find_projections

logger = logging.get_logger(__name__)


@dataclass
class ConceptEditOutput:
    """What `apply_concept_edits` returns.

    Args:
        edits (`tuple[ConceptEdit, ...]`): every edit now applied (this call's last), solved jointly.
        report (`EditReport`): efficacy and interference on keys/values; `print(output)` shows it as a table.
    """

    edits: tuple[ConceptEdit, ...]
    report: EditReport

    def __str__(self) -> str:
        return str(self.report)


class EditState:
    """Everything an applied edit needs: records, target projections, the solution, strength and undo data."""

    def __init__(self, projections: list[Projection], edit_keys: bool, layers: LayerFilter):
        self.projections, self.edit_keys, self.layers = projections, edit_keys, layers
        self.records: list[ConceptEdit] = []
        self.solution: engine.Solution | None = None
        self.scale = 1.0
        self.fused = False
        self.original_processors: dict[str, object] = {}
        self.original_weights: list[torch.Tensor] | None = None
        self.report: EditReport | None = None  # of the latest solve (None for an edit loaded from a file)
        self._device_terms: dict = {}

    def set_solution(self, solution: engine.Solution) -> None:
        self.solution, self._device_terms = solution, {}

    def device_terms(self, device):
        """``Δ = T − I`` and the correction in float32 on `device` (cached), for the processors."""
        if device not in self._device_terms:
            s = self.solution.to(device=device, dtype=torch.float32)
            eye = torch.eye(s.transform.shape[0], device=device)
            self._device_terms[device] = (s.transform - eye, s.correction)
        return self._device_terms[device]

    @property
    def active_scale(self) -> float:
        """Strength the processors apply: 0 while the edit is fused into the weights."""
        return 0.0 if self.fused else self.scale


class UCEMixin(UCEIOMixin, UCELoraMixin):
    """Unified Concept Editing (Gandikota et al., WACV 2024) for a text-to-image pipeline.

    Erases concepts toward guides while preserving others by rewriting, in closed form, every cross-attention key and
    value projection: one float64 solve on the pipeline's device serves all layers. Edits act through
    `UCEAttnProcessor` (weights untouched) until `fuse_concept_edits`; `unload_concept_edits` restores the pipeline bit
    for bit. Which components hold the denoiser, text encoder and tokenizer is set by class attributes, so one mixin
    serves every pipeline family.
    """

    _uce_denoiser_name = "unet"
    _uce_text_encoder_name = "text_encoder"
    _uce_tokenizer_name = "tokenizer"
    _uce_causal_text_encoder = True
    _uce_state: EditState | None = None

    @property
    def concept_edits(self) -> tuple[ConceptEdit, ...]:
        """The edits applied so far, in order (empty when none)."""
        return tuple(self._uce_state.records) if self._uce_state is not None else ()

    def apply_concept_edits(
        self, erase: str | list[str] | None = None, guide: str | list[str] | None = None,
        preserve: str | list[str] | None = None, *, erase_scale: float = 1.0, preserve_scale: float | None = None,
        lamb: float = 0.5, token_mode: str = "last", technique: str = "replace", edit_keys: bool = True,
        layers: LayerFilter = None, held_out: list[str] | None = None, debias: dict | None = None,
        debias_ratios: dict | None = None, attribute_classifier=None, debias_weights: dict | None = None,
        tolerance: float = 0.05, max_iterations: int = 10, debias_options: dict | None = None,
        moderate: str | list[str] | None = None, expand_prompts: str | None = None,
    ) -> ConceptEditOutput:
        r"""Erase concepts toward guides while preserving others, solved jointly with every earlier edit.

        Args:
            erase (`str` or `list[str]`): concepts to erase, e.g. `["Van Gogh", "Picasso"]`; `"@file.txt"` (one per
                line) or `"@file.csv:column"` reads them from a file.
            guide (`str`, `list[str]` or `None`, defaults to `None`): what erased concepts become: one guide for all or
                one per concept; `None` or `""` is the unconditional prompt.
            preserve (`str` or `list[str]`, *optional*): concepts whose keys/values must not change.
            erase_scale (`float`, defaults to 1.0): weight of the erase terms.
            preserve_scale (`float`, *optional*): weight of the preserve terms; defaults to 1.0 in "last" mode and to
                `max(0.1, 1 / (1 + len(preserve)))` in "paper" mode.
            lamb (`float`, defaults to 0.5): pull toward the original weights (> 0); the same for every edit.
            token_mode (`str`, defaults to `"last"`): `"last"` (one token per concept) or `"paper"` (the paper's
                token blocks; DESIGN.md §2).
            technique (`str`, defaults to `"replace"`): `"replace"` or `"tensor"`.
            edit_keys (`bool`, defaults to `True`): edit `to_k` as well as `to_v`; the same for every edit.
            layers (`list[str]` or `Callable[[str], bool]`, *optional*): only edit cross-attention modules whose
                name contains one of these strings; the same for every edit.
            held_out (`list[str]`, *optional*): concepts to measure interference on (a built-in generic set by
                default).
            debias (`dict`, *optional*): concepts to debias with their attribute set(s), e.g.
                `{"doctor": ["male", "female"]}` or `{"doctor": [["male", "female"], ["young", "old"]]}`. Runs the
                debias loop (`diffusers_uce.debias`): generate, classify, move the attribute weights, re-solve.
            debias_ratios (`dict`, *optional*): desired ratios per concept, shaped like `debias` (uniform by default).
            attribute_classifier (`Callable[[list[PIL.Image.Image], list[str]], list[str]]`, *optional*): returns
                one label per image; CLIP zero-shot by default.
            debias_weights (`dict`, *optional*): attribute weights shaped like `debias`: solve once with them, no loop.
            tolerance (`float`, defaults to 0.05): the loop stops when every ratio is this close to its target.
            max_iterations (`int`, defaults to 10): the loop's budget.
            debias_options (`dict`, *optional*): generation and step settings of the loop (see
                `diffusers_uce.debias.DebiasOptions`).
            moderate (`str` or `list[str]`, *optional*): concepts to erase toward the unconditional prompt with the
                paper's moderation defaults (`preserve_scale=0.1` unless given), or a preset: `"i2p"` (the I2P
                categories), `"nudity"` (see `diffusers_uce.concepts.MODERATION_PRESETS`).
            expand_prompts (`str`, *optional*): `"art"` or `"object"`: add the paper's templates around every erased
                concept and its guide ("painting by {}", ... / "image of {}", ...).

        Returns:
            [`ConceptEditOutput`]: the edits now applied and the report (`print(output)` shows it).

        Example:
        ```py
        >>> pipe = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4"))
        >>> out = pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", preserve=["Monet", "Rembrandt"])
        >>> print(out.report)
        >>> image = pipe("a starry night by Van Gogh").images[0]
        ```
        """
        state = self._uce_state
        earlier = state.records if state is not None else []
        preserve = resolve_concept_arg(preserve)
        erase, guide = erase_requests(erase, guide, moderate=moderate, expand=expand_prompts)
        if moderate is not None and preserve_scale is None:
            preserve_scale = MODERATION_DEFAULTS["preserve_scale"]

        def build(weights=debias_weights) -> ConceptEdit:
            return build_concept_edit(
                erase, guide, preserve, erase_scale=erase_scale,
                preserve_scale=preserve_scale, lamb=lamb, token_mode=token_mode, technique=technique,
                earlier=earlier, debias=debias, debias_weights=weights,
            )

        record = build()
        if state is not None and (edit_keys != state.edit_keys or layers != state.layers):
            raise ValueError(
                f"edit_keys/layers must match the edits already applied (edit_keys={state.edit_keys}, "
                f"layers={state.layers!r}); call unload_concept_edits() first to change them"
            )
        solve = lambda rec: self._uce_solve([*earlier, rec], edit_keys, layers, held_out)  # noqa: E731
        if debias is not None and debias_weights is None:
            from .debias import debias_loop

            return debias_loop(self, build, solve, ratios=debias_ratios, classifier=attribute_classifier,
                               tolerance=tolerance, max_iterations=max_iterations, **(debias_options or {}))
        return solve(record)

    def _uce_solve(self, records: list[ConceptEdit], edit_keys: bool, layers: LayerFilter,
                   held_out: list[str] | None) -> ConceptEditOutput:
        """Solve `records` jointly from the original weights, report, and install the result (validated inputs)."""
        state = self._uce_state
        text_encoder = getattr(self, self._uce_text_encoder_name)
        projections = find_projections(
            getattr(self, self._uce_denoiser_name), edit_keys=edit_keys, layers=layers,
            context_dim=text_encoder.config.hidden_size,
        )
        device = self._execution_device
        originals = state.original_weights if state is not None and state.fused else [p.module.weight for p in projections]
        weights, row_layer = _stack(originals, device)

        named = {c for r in records for c in (*r.erase, *r.preserve)}
        held = [c for c in (DEFAULT_HOLDOUT_CONCEPTS if held_out is None else held_out) if c not in named]
        causal_cut = self._uce_causal_text_encoder and all(r.token_mode == "last" for r in records)
        encoded = encode_prompts(getattr(self, self._uce_tokenizer_name), text_encoder,
                                 engine.prompts_of(records) + held, causal_cut=causal_cut, device=device)
        if not bool(torch.isfinite(encoded.states).all()):
            raise ValueError("the text encoder returned non-finite hidden states; nothing was changed. "
                             "Check the text encoder's weights and dtype (fp16 overflow?)")
        assembled = engine.assemble_terms(records, encoded)
        solution = engine.solve(assembled, weights, row_layer, len(projections))
        if not solution.is_finite():
            raise ValueError("the edit solve gave non-finite values; nothing was changed. Lower erase_scale/"
                             "preserve_scale or raise lamb")
        fused_weights = None
        if state is not None and state.fused:
            fused_weights = _fused(originals, weights, row_layer, solution, state.scale)

        num_report_tokens = len(assembled.terms.erase) + len(assembled.terms.preserve) + len(held)
        if solution.correction is not None:
            grams = grouped_grams(list(weights.split([w.shape[0] for w in originals])))
        elif 2 * num_report_tokens < weights.shape[1]:  # few tokens: ‖W_all u‖² directly beats forming W_allᵀW_all
            grams = weights
        else:
            grams = (weights.T @ weights).double()[None]
        held_tokens = None
        if held:
            rows = encoded.rows(held)
            group, pos = preserve_positions(encoded.last[rows], records[-1].token_mode, encoded.max_length)
            held_tokens = (held, encoded.states[rows[group], pos].double(), group)
        report = build_report(grams, solution, assembled, len(projections), held_tokens)

        # Validated and solved: only now is the pipeline changed.
        self._uce_set_edit(projections, edit_keys, layers, records, solution, fused_weights).report = report
        logger.info(f"Applied {len(records)} concept edit(s) to {len(projections)} projections")
        return ConceptEditOutput(edits=tuple(records), report=report)

    def fuse_concept_edits(self) -> None:
        """Write the applied edit (at its current strength) into the `to_k`/`to_v` weights: no inference overhead.

        `unfuse_concept_edits` undoes it exactly; after fusing, `save_pretrained` writes a plain pipeline that
        vanilla diffusers loads.
        """
        state = self._uce_require_state("fuse")
        if state.fused:
            logger.warning("concept edits are already fused; nothing to do")
            return
        originals = [p.module.weight.detach().clone() for p in state.projections]
        weights, row_layer = _stack(originals, self._execution_device)
        new = _fused(originals, weights, row_layer, state.solution, state.scale)
        _write(state.projections, new)
        state.original_weights, state.fused = originals, True

    def unfuse_concept_edits(self) -> None:
        """Restore the weights saved by `fuse_concept_edits` bit for bit; the edit keeps acting via the processors."""
        state = self._uce_require_state("unfuse")
        if not state.fused:
            logger.warning("concept edits are not fused; nothing to do")
            return
        _write(state.projections, state.original_weights)
        state.original_weights, state.fused = None, False

    def set_concept_edit_scale(self, scale: float) -> None:
        """Set the strength of the applied edit: 0 off, 1 full, in between partial, above 1 stronger.

        Args:
            scale (`float`): the strength ``s``; the transform becomes ``I + s (T − I)``.
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite number, got {scale!r}")
        state = self._uce_require_state("scale")
        if state.fused:
            weights, row_layer = _stack(state.original_weights, self._execution_device)
            new = _fused(state.original_weights, weights, row_layer, state.solution, float(scale))
            _write(state.projections, new)
        state.scale = float(scale)

    def unload_concept_edits(self) -> None:
        """Remove every concept edit: the original processors and weights come back bit for bit."""
        state = self._uce_state
        if state is None:
            logger.warning("no concept edits to unload")
            return
        if state.fused:
            _write(state.projections, state.original_weights)
        denoiser = getattr(self, self._uce_denoiser_name)
        for name, processor in state.original_processors.items():
            denoiser.get_submodule(name).set_processor(processor)
        self._uce_state = None

    def save_pretrained(self, save_directory, *args, fuse_concept_edits: bool = False, **kwargs):
        """`DiffusionPipeline.save_pretrained`, refusing to drop an edit that is not fused.

        Args:
            fuse_concept_edits (`bool`, defaults to `False`): fuse applied edits first instead of refusing.
        """
        self._uce_require_fused(fuse_concept_edits, "save")
        # diffusers splits save_directory as a string when pushing: accept any os.PathLike
        return super().save_pretrained(os.fspath(save_directory), *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args, fuse_concept_edits: bool = False, **kwargs):
        """`push_to_hub`, refusing (before anything is created on the Hub) to push an edit that is not fused."""
        self._uce_require_fused(fuse_concept_edits, "push")
        return super().push_to_hub(repo_id, *args, **kwargs)

    def _uce_require_fused(self, fuse: bool, action: str) -> None:
        state = self._uce_state
        if state is None or state.fused:
            return
        if not fuse:
            raise ValueError(
                f"this pipeline has concept edits that are not fused, so {action} would drop them: call "
                f"pipe.fuse_concept_edits() first (or pass fuse_concept_edits=True) to {action} the edited model, or "
                "use pipe.save_concept_edits(...) for the edit alone"
            )
        self.fuse_concept_edits()

    def to_json_string(self) -> str:
        # Saved pipelines must load without the plugin: record the base pipeline class, not the UCE subclass.
        config = json.loads(super().to_json_string())
        config["_class_name"] = base_pipeline_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _uce_require_state(self, action: str) -> EditState:
        if self._uce_state is None:
            raise ValueError(f"no concept edits to {action}: call apply_concept_edits() first")
        return self._uce_state

    def _uce_set_edit(self, projections, edit_keys, layers, records, solution, fused_weights=None) -> EditState:
        """Install a validated, solved edit: the one place where applying or loading changes the pipeline.

        Args:
            projections (`list[Projection]`): the edited projections, in solve order.
            edit_keys (`bool`), layers: the options every later edit must share.
            records (`list[ConceptEdit]`): all edit records, now solved jointly.
            solution (`engine.Solution`): their solution at strength 1.
            fused_weights (`list[torch.Tensor]`, *optional*): new weights to write when the edit is fused.
        """
        state = self._uce_state
        if state is None:
            state = EditState(projections, edit_keys, layers)
            self._uce_install_processors(state)
            self._uce_state = state
        state.records = list(records)
        state.set_solution(solution)
        state.report = None
        if fused_weights is not None:
            _write(state.projections, fused_weights)
        return state

    def _uce_install_processors(self, state: EditState) -> None:
        denoiser = getattr(self, self._uce_denoiser_name)
        edits: dict[str, dict[str, ProjectionEdit]] = {}
        for index, projection in enumerate(state.projections):
            edits.setdefault(projection.attention, {})[projection.kind] = ProjectionEdit(state, index)
        for name, kinds in edits.items():
            attention = denoiser.get_submodule(name)
            state.original_processors[name] = attention.processor
            attention.set_processor(UCEAttnProcessor(attention.processor, kinds.get("to_k"), kinds.get("to_v")))


def _stack(weights: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_all`` on `device` (float32, or float64 for float64 weights) and the layer index of each of its rows."""
    dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    stacked = torch.cat([w.detach().to(device=device, dtype=dtype) for w in weights])
    sizes = torch.tensor([w.shape[0] for w in weights], device=device)
    return stacked, torch.repeat_interleave(torch.arange(len(weights), device=device), sizes)


def _fused(originals, weights, row_layer, solution: engine.Solution, scale: float):
    """Edited weights of every layer at strength `scale`, each in its own dtype/device; raises if not finite."""
    s = solution.to(device=weights.device, dtype=weights.dtype)
    transform, correction = scaled(s.transform, s.correction, scale)
    new = edited_weights(weights, transform, correction, row_layer)
    if not bool(torch.isfinite(new).all()):
        raise ValueError(f"the edit at scale {scale} gives non-finite weights; nothing was changed. Lower the "
                         "erase/preserve scales or the edit scale, or raise lamb")
    return [part.to(device=w.device, dtype=w.dtype) for part, w in zip(new.split([w.shape[0] for w in originals]),
                                                                       originals)]


@torch.no_grad()
def _write(projections: list[Projection], weights: list[torch.Tensor]) -> None:
    for projection, weight in zip(projections, weights):
        projection.module.weight.copy_(weight)


def base_pipeline_class(cls: type) -> type:
    """The first pipeline class in `cls`'s MRO that is not a UCE class: what saved configs must name."""
    return next(c for c in cls.__mro__ if issubclass(c, DiffusionPipeline) and not issubclass(c, UCEMixin))

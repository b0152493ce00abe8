"""`UCEMixin`: concept editing methods for diffusers pipelines, and `attach` to add them to a loaded pipeline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from ..core import engine
from ..core.edits import ConceptEdit, concept_edit_request
from ..core.families import STABLE_DIFFUSION, Family, TargetGroup
from ..core.layerwise import StackedWeights
from ..core.precise import smallest_right_singular_vectors
from ..core.prompts import EncodedPrompts, encode_prompts, preserve_positions
from ..core.report import DEFAULT_HOLDOUT_CONCEPTS, EditReport, build_report
from ..core.solve import grouped_grams, homogeneous
from ..core.speed_solve import assemble_speed, full_length_prompts, merge_encoded, solve_speed, speed_prompts
from ..core.targets import LayerFilter, find_linear_layers, find_projections
from .edit_file import UCEIOMixin
from .edit_state import EditState, GroupEdit, UCEEditStateMixin
from .lora import UCELoraMixin

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


class UCEMixin(UCEIOMixin, UCELoraMixin, UCEEditStateMixin):
    """Unified Concept Editing (Gandikota et al., WACV 2024) for a text-to-image pipeline.

    Erases concepts toward guides while preserving others by rewriting, in closed form, the layers that read the text
    embeddings: every cross-attention key and value projection (SD 1.x/2.x, SDXL), or FLUX's `context_embedder` and
    pooled-text `linear_1`. One float64 solve on the pipeline's device serves all layers of a kind. Edits act through
    `UCEAttnProcessor` (FLUX: forward hooks), weights untouched, until `fuse_concept_edits`; `unload_concept_edits`
    restores the pipeline bit for bit. Which layers are edited and which text states feed them is set by one class
    attribute, `_uce_family` (a `diffusers_uce.core.families.Family`), so one mixin serves every pipeline family.
    """

    _uce_family: Family = STABLE_DIFFUSION

    def apply_concept_edits(
        self, erase: str | list[str] | None = None, guide: str | list[str] | None = None,
        preserve: str | list[str] | None = None, *, erase_scale: float = 1.0, preserve_scale: float | None = None,
        lamb: float = 0.5, token_mode: str = "last", technique: str = "replace", edit_keys: bool = True,
        layers: LayerFilter = None, held_out: list[str] | None = None, moderate: str | list[str] | None = None,
        expand_prompts: str | None = None, method: str = "uce", method_options: dict | None = None,
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
                token blocks: from the last real token to the padding, paired with the guide's).
            technique (`str`, defaults to `"replace"`): `"replace"` or `"tensor"`.
            edit_keys (`bool`, defaults to `True`): edit `to_k` as well as `to_v` (FLUX has neither: keep `True`); the
                same for every edit.
            layers (`list[str]` or `Callable[[str], bool]`, *optional*): only edit cross-attention modules (FLUX: the
                layers) whose name contains one of these strings; the same for every edit.
            held_out (`list[str]`, *optional*): concepts to measure interference on (a built-in generic set by
                default).
            moderate (`str` or `list[str]`, *optional*): concepts to erase toward the unconditional prompt with the
                paper's moderation defaults (`preserve_scale=0.1` unless given), or a preset: `"i2p"` (the I2P
                categories), `"nudity"` (see `diffusers_uce.core.concepts.MODERATION_PRESETS`).
            expand_prompts (`str`, *optional*): `"art"` or `"object"`: add the paper's templates around every erased
                concept and its guide ("painting by {}", ... / "image of {}", ...).
            method (`str`, defaults to `"uce"`): `"uce"`, or `"speed"` for precise erasure (SPEED, Li et al., ICLR
                2026): the change is confined to the directions the retain set (`preserve`, e.g.
                `diffusers_uce.retain_set("artists")`; `""` when empty) does not use, and invariant tokens are kept
                exactly. Retain prompts naming an erased concept as a whole word are left out. Every edit of a
                pipeline uses one method; `erase_scale`, `preserve_scale`, `lamb`, `token_mode` and `technique` apply
                to `"uce"` only.
            method_options (`dict`, *optional*): options of `"speed"`, the same for every edit: `threshold` (0.1),
                `retain_scale` (1.0; 0.05 suits 10–100 celebrities), `invariant_lamb` (0.0: invariants exact),
                `augment` (10 copies per retain token; 0 turns prior refinement off), `filter` (`True`), `seed` (0),
                `invariants` (`"auto"`, a list of prompts or a `(k, d)` tensor). See
                `diffusers_uce.core.speed_options.SPEED_DEFAULTS`.

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
        record = concept_edit_request(
            erase, guide, preserve, moderate=moderate, expand_prompts=expand_prompts, erase_scale=erase_scale,
            preserve_scale=preserve_scale, lamb=lamb, token_mode=token_mode, technique=technique,
            earlier=self.concept_edits, method=method, method_options=method_options,
        )
        self._uce_check_options(edit_keys, layers)
        return self._uce_solve([*self.concept_edits, record], edit_keys, layers, held_out)

    def debias_concepts(
        self, concepts: dict, ratios: dict | list | None = None, *, weights: dict | None = None,
        classifier=None, tolerance: float = 0.05, max_iterations: int = 10, options: dict | None = None,
        preserve: str | list[str] | None = None, erase_scale: float = 1.0, preserve_scale: float | None = None,
        lamb: float = 0.5, edit_keys: bool = True, layers: LayerFilter = None, held_out: list[str] | None = None,
    ) -> ConceptEditOutput:
        r"""Debias concepts toward desired attribute ratios, solved jointly with every other edit.

        Each concept's keys/values move toward a weighted mix of its attribute variants ("female doctor", "male
        doctor"). The weights are found by a loop: generate images of the concept, classify their attributes, move
        the weights toward the gap, solve again; until every ratio is within `tolerance` or after `max_iterations`
        solves. With `weights`, one solve with those weights and no images.

        Args:
            concepts (`dict`): concepts with their attribute set(s), e.g. `{"doctor": ["male", "female"]}` or
                `{"doctor": [["male", "female"], ["young", "old"]]}`.
            ratios (`dict` or `list`, *optional*): desired ratios per concept, shaped like `concepts` (uniform by
                default); one list applies to every concept.
            weights (`dict`, *optional*): attribute weights shaped like `concepts`: solve once with them, no loop.
            classifier (`Callable[[list[PIL.Image.Image], list[str]], list[str]]`, *optional*): returns one label per
                image; CLIP zero-shot by default.
            tolerance (`float`, defaults to 0.05): the loop stops when every ratio is this close to its target.
            max_iterations (`int`, defaults to 10): the loop's budget of solves.
            options (`dict`, *optional*): generation and step settings of the loop (see
                `diffusers_uce.loaders.debias.DebiasOptions`).
            preserve, erase_scale, preserve_scale, lamb, edit_keys, layers, held_out: as in `apply_concept_edits`.

        Returns:
            [`ConceptEditOutput`]: the last solve's; its `report.ratios` lists, per concept and attribute set, the
            target, the ratios before and after, the weights and the history of the loop.

        Example:
        ```py
        >>> out = pipe.debias_concepts({"doctor": ["male", "female"], "nurse": ["male", "female"]})
        >>> print(out.report)
        ```
        """
        record = concept_edit_request(
            None, None, preserve, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb,
            earlier=self.concept_edits, debias=concepts, debias_weights=weights,
        )
        self._uce_check_options(edit_keys, layers)
        earlier = list(self.concept_edits)
        solve = lambda rec: self._uce_solve([*earlier, rec], edit_keys, layers, held_out)  # noqa: E731
        if weights is not None:
            return solve(record)
        from .debias import debias_loop

        return debias_loop(self, record, solve, ratios=ratios, classifier=classifier, tolerance=tolerance,
                           max_iterations=max_iterations, **(options or {}))

    def _uce_check_options(self, edit_keys, layers) -> None:
        """Refuse options that must match the edits already applied (they are solved jointly)."""
        state = self._uce_state
        if state is not None and (edit_keys != state.edit_keys or layers != state.layers):
            raise ValueError(
                f"edit_keys/layers must match the edits already applied (edit_keys={state.edit_keys}, "
                f"layers={state.layers!r}); call unload_concept_edits() first to change them"
            )

    def _uce_solve(self, records: list[ConceptEdit], edit_keys: bool, layers: LayerFilter,
                   held_out: list[str] | None) -> ConceptEditOutput:
        """Solve `records` jointly from the original weights, report, and install the result (validated inputs)."""
        state = self._uce_state
        groups = state.groups if state is not None else self._uce_groups(EditState(edit_keys, layers))
        device = self._execution_device
        named = {c for r in records for c in (*r.erase, *r.preserve)}
        held = [c for c in (DEFAULT_HOLDOUT_CONCEPTS if held_out is None else held_out) if c not in named]
        precise = records[-1].method == "speed"
        prompts = (speed_prompts(records) if precise else engine.prompts_of(records)) + held
        solutions, parts = [], []
        for group in groups:  # one solve per target group (one for UNet families, two for FLUX)
            weights, row_layer = group.stacked(device)
            plain = weights[:, :-1] if group.biased else weights
            if precise:  # the prompts read at full length are encoded apart; the others stop at their last token
                full = full_length_prompts(records)
                encodings = [self._uce_encode(group.group, batch, cut, device) for batch, cut in (
                    ([p for p in prompts if p not in full], True), (full, False)) if batch]
                encoded = encodings[0] if len(encodings) == 1 else merge_encoded(*encodings)
            else:
                encoded = self._uce_encode(group.group, prompts, all(r.token_mode == "last" for r in records), device)
            if precise:
                assembled, solution = self._uce_solve_precise(group, records, encoded, plain, row_layer)
            else:
                assembled = engine.assemble_terms(records, encoded)
                solution = engine.solve(assembled, plain, row_layer, len(group.projections), biased=group.biased)
            if not solution.is_finite():
                raise ValueError("the edit solve gave non-finite values; nothing was changed. Lower erase_scale/"
                                 "preserve_scale or raise lamb")
            solutions.append(solution)
            parts.append(self._uce_report_part(group, weights, solution, assembled, encoded, held, records))
        report = build_report(parts, sum(len(g.projections) for g in groups))
        fused = None
        if state is not None and state.fused:
            fused = [g.fused_weights(state.scale, device, s) for g, s in zip(groups, solutions)]

        # Validated and solved: only now is the pipeline changed.
        self._uce_set_edit(groups, records, solutions, fused).report = report
        logger.info(f"Applied {len(records)} concept edit(s) to {report.layers} layers")
        return ConceptEditOutput(edits=tuple(records), report=report)

    @staticmethod
    def _uce_solve_precise(group: GroupEdit, records, encoded, plain, row_layer):
        """Precise erasure of one group (`method="speed"`); the weights' weakest directions are cached per group."""
        assembled = assemble_speed(records, encoded)
        options = records[-1].method_options
        if options["augment"] > 0 and group.singular is None:
            group.singular = smallest_right_singular_vectors(plain, row_layer, len(group.projections))
        solution, _ = solve_speed(assembled, options, plain, row_layer, len(group.projections), group.biased,
                                  group.singular if options["augment"] > 0 else None)
        return assembled, solution

    def _uce_groups(self, state: EditState) -> list[GroupEdit]:
        """The family's target groups with the layers `state.edit_keys`/`state.layers` select (checked)."""
        family = self._uce_family
        if not state.edit_keys and not family.has_keys:
            raise ValueError(f"edit_keys=False needs key/value projections, and {family.name} pipelines edit "
                             f"{family.named_layers}: leave edit_keys=True")
        groups = []
        for group in family.groups:
            component = getattr(self, group.component)
            width = group.text_width(self)
            if group.cross_attention:
                found = find_projections(component, edit_keys=state.edit_keys, layers=state.layers, context_dim=width)
            else:
                found = find_linear_layers(component, group.modules, layers=state.layers, context_dim=width)
            if found:
                groups.append(GroupEdit(state, group, found))
        if not groups:
            raise ValueError(f"layers={state.layers!r} selects none of the layers concept editing changes in "
                             f"{family.name} pipelines ({family.named_layers})")
        return groups

    def _uce_encode(self, group: TargetGroup, prompts: list[str], last_only: bool, device) -> EncodedPrompts:
        """Hidden states of `prompts` as `group`'s layers read them (one batched pass per text encoder)."""
        text = group.text
        encoders = [(getattr(self, tok), getattr(self, enc)) for tok, enc in text.encoders]
        encoded = encode_prompts(encoders, prompts, causal_cut=text.causal and last_only, output=text.output,
                                 max_length=text.max_length, device=device)
        if not bool(torch.isfinite(encoded.states).all()):
            raise ValueError("the text encoder returned non-finite hidden states; nothing was changed. "
                             "Check the text encoder's weights and dtype (fp16 overflow?)")
        return encoded

    @staticmethod
    def _uce_report_part(group: GroupEdit, weights, solution, assembled, encoded, held, records):
        """What `build_report` needs from one group: its Gram matrices (or weights) and its tokens."""
        num_tokens = len(assembled.terms.erase) + len(assembled.terms.preserve) + len(held)
        if solution.layerwise is not None:  # precise erasure: one change per layer, measured on the stacked weights
            grams = StackedWeights(weights, torch.repeat_interleave(
                torch.arange(len(group.projections), device=weights.device),
                torch.tensor([p.module.weight.shape[0] for p in group.projections], device=weights.device)))
        elif solution.correction is not None:
            grams = grouped_grams(list(weights.split([p.module.weight.shape[0] for p in group.projections])))
        elif 2 * num_tokens < weights.shape[1]:  # few tokens: ‖W_all u‖² directly beats forming W_allᵀW_all
            grams = weights
        else:
            grams = (weights.T @ weights).double()[None]
        held_tokens = None
        if held:
            rows = encoded.rows(held)
            index, pos = preserve_positions(encoded.last[rows], records[-1].token_mode, encoded.max_length)
            tokens = encoded.states[rows[index], pos].double()
            held_tokens = (held, homogeneous(tokens) if group.biased else tokens, index)
        if group.biased:
            assembled = engine.homogeneous_terms(assembled)
        return grams, solution, assembled, held_tokens

    def save_pretrained(self, save_directory, *args, fuse_concept_edits: bool = False,
                        overwrite_model_card: bool = False, **kwargs):
        """`DiffusionPipeline.save_pretrained`, refusing to drop an edit that is not fused; with the installed plugin
        it also writes the model card of the fused edit (`base_model_relation: finetune`).

        Args:
            fuse_concept_edits (`bool`, defaults to `False`): fuse applied edits first instead of refusing.
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the folder.
        """
        self._uce_require_fused(fuse_concept_edits, "save")
        # diffusers splits save_directory as a string when pushing: accept any os.PathLike
        result = super().save_pretrained(os.fspath(save_directory), *args, **kwargs)
        if self._uce_state is not None and not kwargs.get("push_to_hub", False):
            self._uce_write_model_card(save_directory, "finetune", overwrite=overwrite_model_card)
        return result

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
        config["_class_name"] = self._uce_base_class().__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def _uce_base_class(cls) -> type:
        """The first pipeline class in the MRO that is not a UCE class: what saved configs and cards must name."""
        return next(c for c in cls.__mro__ if issubclass(c, DiffusionPipeline) and not issubclass(c, UCEMixin))

    def _uce_write_model_card(self, save_directory, kind: str, *, overwrite: bool = False, **card) -> None:
        """Hook called after an edit or a fused model is saved: write its model card into `save_directory`.

        The plugin's `UCEHubMixin` writes the generated card (`kind`: `"adapter"` or `"finetune"`; `card`: the
        file names and repo id it shows); the bare mixin, which the single-file community pipeline carries, writes
        none.
        """

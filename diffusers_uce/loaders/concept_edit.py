"""`UCEMixin`: concept editing methods for diffusers pipelines, and `attach` to add them to a loaded pipeline."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from ..core.edits import ConceptEdit, check_held_out, concept_edit_request
from ..core.families import STABLE_DIFFUSION, Family
from ..core.hardening import robustness_rows
from ..core.report import DEFAULT_HOLDOUT_CONCEPTS, EditReport, build_report
from ..core.targets import LayerFilter
from ..utils.checks import check_base_model, check_license
from ..utils.demo_mark import is_demo_pipeline
from ..utils.folders import atomic_folder
from ..utils.safetensors_io import check_finite_modules
from .edit_file import UCEIOMixin
from .edit_state import EditState
from .lora import UCELoraMixin
from .robust import UCERobustMixin
from .single_file import UCESingleFileMixin
from .solver import UCESolverMixin
from .state_mixin import UCEEditStateMixin, serialized

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


class UCEMixin(UCEIOMixin, UCELoraMixin, UCESingleFileMixin, UCERobustMixin, UCESolverMixin, UCEEditStateMixin):
    """Unified Concept Editing (Gandikota et al., WACV 2024) for a text-to-image pipeline.

    Erases concepts toward guides while preserving others by rewriting, in closed form, the layers that read the text
    embeddings: every cross-attention key and value projection (SD 1.x/2.x, SDXL), or FLUX's `context_embedder` and
    pooled-text `linear_1`. One float64 solve on the pipeline's device serves all layers of a kind. Edits act through
    `UCEAttnProcessor` (FLUX: forward hooks), weights untouched, until `fuse_concept_edits`; `unload_concept_edits`
    restores the pipeline bit for bit. Which layers are edited and which text states feed them is set by one class
    attribute, `_uce_family` (a `diffusers_uce.core.families.Family`), so one mixin serves every pipeline family.
    """

    _uce_family: Family = STABLE_DIFFUSION

    @serialized
    def apply_concept_edits(
        self, erase: str | list[str] | None = None, guide: str | list[str] | None = None,
        preserve: str | list[str] | None = None, *, erase_scale: float = 1.0, preserve_scale: float | None = None,
        lamb: float = 0.5, token_mode: str = "last", technique: str = "replace", edit_keys: bool = True,
        layers: LayerFilter = None, held_out: list[str] | None = None, moderate: str | list[str] | None = None,
        expand_prompts: str | None = None, harden: bool | int = False, harden_options: dict | None = None,
        method: str = "uce", method_options: dict | None = None, adapter_name: str | None = None,
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
            harden (`bool` or `int`, defaults to `False`): after the edit is solved, run this many hardening rounds
                for its erased concepts (RECE, Gong et al., ECCV 2024): each round finds, in closed form, the text
                embedding that best brings an erased concept back and edits it to the guide too. `True` uses the
                authors' settings: 3 rounds at `reg=0.1` for moderation and "nudity", 1 round at `reg=1e-3` for
                `expand_prompts` edits (artists, objects), 2 rounds at `reg=0.1` otherwise. Hardening trades
                preservation for robustness; not available with the "tensor" technique or debiasing.
            harden_options (`dict` or `HardenOptions`, *optional*): `reg` (the attacker's ``ρ``), `lamb` (0.1),
                `preserve_scale` (0.1), `preserve` (`" "` once per erased concept) and `tokens` (`"all"`: every
                position of the concept and guide prompts, as the authors; `"record"`: the edit's own tokens); see
                `diffusers_uce.core.hardening.HardenOptions`.
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

            adapter_name (`str`, *optional*): a name for this edit (`"edit_<n>"` by default), to remove it later with
                `remove_concept_edits(name)`; `get_concept_edit_names()` lists them.

        Returns:
            [`ConceptEditOutput`]: the edits now applied and the report (`print(output)` shows it; its `robustness`
            rows give each erased concept's adversarial recovery before hardening and after each round).

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
            earlier=self.concept_edits, harden=harden, harden_options=harden_options, method=method,
            method_options=method_options, name=self._uce_new_name(adapter_name),
        )
        held_out = self._uce_check_options(edit_keys, layers, held_out)
        return self._uce_solve([*self.concept_edits, record], edit_keys, layers, held_out)

    @serialized
    def debias_concepts(
        self, concepts: dict, ratios: dict | list | None = None, *, weights: dict | None = None,
        classifier=None, tolerance: float = 0.05, max_iterations: int = 10, options: dict | None = None,
        preserve: str | list[str] | None = None, erase_scale: float = 1.0, preserve_scale: float | None = None,
        lamb: float = 0.5, edit_keys: bool = True, layers: LayerFilter = None, held_out: list[str] | None = None,
        adapter_name: str | None = None,
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
            preserve (`str` or `list[str]`, *optional*): as in `apply_concept_edits`.
            erase_scale (`float`, defaults to 1.0): as in `apply_concept_edits`.
            preserve_scale (`float`, *optional*): as in `apply_concept_edits`.
            lamb (`float`, defaults to 0.5): as in `apply_concept_edits`.
            edit_keys (`bool`, defaults to `True`): as in `apply_concept_edits`.
            layers (`list[str]` or `Callable`, *optional*): as in `apply_concept_edits`.
            held_out (`list[str]`, *optional*): as in `apply_concept_edits`.
            adapter_name (`str`, *optional*): as in `apply_concept_edits`.

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
            earlier=self.concept_edits, debias=concepts, debias_weights=weights, name=self._uce_new_name(adapter_name),
        )
        held_out = self._uce_check_options(edit_keys, layers, held_out)
        earlier = list(self.concept_edits)
        solve = lambda rec: self._uce_solve([*earlier, rec], edit_keys, layers, held_out)  # noqa: E731
        if weights is not None:
            return solve(record)
        from .debias import debias_loop

        return debias_loop(self, record, solve, ratios=ratios, classifier=classifier, tolerance=tolerance,
                           max_iterations=max_iterations, **(options or {}))

    def __call__(self, *args, **kwargs):
        # The edit must still act when the pipeline generates: see `_uce_check_installed`.
        self._uce_check_installed()
        return super().__call__(*args, **kwargs)

    def get_concept_edit_names(self) -> list[str]:
        """The names of the applied edits, in the order they were applied (`adapter_name`, or `"edit_<n>"`)."""
        return list(dict.fromkeys(self._uce_record_names()))

    @serialized
    def remove_concept_edits(self, adapter_names: str | list[str]) -> ConceptEditOutput | None:
        r"""Remove the named edits; the others are solved again, jointly, from the original weights.

        Unlike LoRA adapters, concept edits are not stacked one on top of another: every edit of a pipeline is one
        joint solve, so removing one re-solves the rest (a second, not a subtraction), and a strength applies to all.

        Args:
            adapter_names (`str` or `list[str]`): the names (`get_concept_edit_names()`) of the edits to remove.

        Returns:
            [`ConceptEditOutput`] of the edits kept, or `None` when none is left (the pipeline is then as before any
            edit, as after `unload_concept_edits`).
        """
        state = self._uce_require_state("remove")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        known = self._uce_record_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"no concept edit is named {unknown[0]!r}; the applied edits are "
                             f"{list(dict.fromkeys(known))}")
        kept = [replace(r, name=n) for r, n in zip(state.records, known) if n not in names]
        if not kept:
            self.unload_concept_edits()
            return None
        return self._uce_solve(kept, state.edit_keys, state.layers, None)

    def _uce_record_names(self) -> list[str]:
        """Each applied record's name; records of old edit files without one are called `"edit_<position>"`."""
        return [r.name or f"edit_{i}" for i, r in enumerate(self.concept_edits)]

    def _uce_new_name(self, adapter_name: str | None) -> str:
        """The name of a new edit: `adapter_name` (checked to be new), or the first free `"edit_<n>"`."""
        names = set(self._uce_record_names())
        if adapter_name is None:
            number = len(self.concept_edits)
            while f"edit_{number}" in names:
                number += 1
            return f"edit_{number}"
        if not isinstance(adapter_name, str) or not adapter_name.strip():
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in names:
            raise ValueError(f"an applied concept edit is already named {adapter_name!r}: choose another name, or "
                             f"remove_concept_edits({adapter_name!r}) first")
        return adapter_name

    def _uce_solve(self, records: list[ConceptEdit], edit_keys: bool, layers: LayerFilter,
                   held_out: list[str] | None) -> ConceptEditOutput:
        """Solve `records` jointly from the original weights, report, and install the result (validated inputs)."""
        self._uce_carry_over()  # a fused edit: a change merged into its weights since is kept
        state = self._uce_state
        groups = state.groups if state is not None else self._uce_groups(EditState(edit_keys, layers))
        named = {c for r in records for c in (*r.erase, *r.preserve)}
        held = [c for c in (DEFAULT_HOLDOUT_CONCEPTS if held_out is None else held_out) if c not in named]
        solutions, parts, robust = self._uce_solutions(records, groups, held)
        report = build_report(parts, sum(len(g.projections) for g in groups))
        report.demo = is_demo_pipeline(self)
        if all(sums is not None for sums in robust):
            report.robustness = robustness_rows(records, robust)
        fused = None
        if state is not None and state.fused:
            fused = [g.fused_weights(state.scale, self._execution_device, s) for g, s in zip(groups, solutions)]

        # Validated and solved: only now is the pipeline changed.
        self._uce_set_edit(groups, records, solutions, fused).report = report
        logger.info(f"Applied {len(records)} concept edit(s) to {report.layers} layers")
        return ConceptEditOutput(edits=tuple(records), report=report)

    def _uce_check_options(self, edit_keys, layers, held_out) -> list[str] | None:
        """Check the options every edit shares (the layers they select must be those already edited: edits are
        solved jointly); returns `held_out` as a list."""
        if not isinstance(edit_keys, bool):
            raise TypeError(f"edit_keys must be True or False, got {edit_keys!r}")
        held_out = check_held_out(held_out)
        state = self._uce_state
        if state is not None and (edit_keys != state.edit_keys or layers != state.layers):
            try:
                selected = [(g.group.name, p.name) for g in self._uce_groups(EditState(edit_keys, layers))
                            for p in g.projections]
            except ValueError:  # selects nothing (or asks for keys FLUX does not have)
                selected = None
            if selected != [(g.group.name, p.name) for g in state.groups for p in g.projections]:
                raise ValueError(
                    f"edit_keys/layers must match the edits already applied: they select other layers than "
                    f"edit_keys={state.edit_keys}, layers={state.layers!r}; call unload_concept_edits() first to "
                    "change them"
                )
        return held_out

    @serialized
    def save_pretrained(self, save_directory, *args, fuse_concept_edits: bool = False,
                        overwrite_model_card: bool = False, base_model: str | None = None, license: str | None = None,
                        **kwargs):
        """`DiffusionPipeline.save_pretrained`, refusing to drop an edit that is not fused; with the installed plugin
        it also writes the model card of the fused edit (`base_model_relation: finetune`).

        Args:
            fuse_concept_edits (`bool`, defaults to `False`): fuse applied edits first instead of refusing.
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the folder (it is
                kept otherwise, unless it is a card diffusers-uce wrote and nobody edited since).
            base_model (`str`, *optional*): the Hub id of the base model (`"owner/name"`) for the card's metadata, when
                the pipeline was loaded from a local folder.
            license (`str`, *optional*): the licence id for the card's metadata; by default the base model's when it
                is a well-known model.
        """
        card = {"base_model": check_base_model(base_model), "license": check_license(license)}
        self._uce_require_fused(fuse_concept_edits, "save")
        save_directory = os.fspath(save_directory)  # diffusers splits it as a string when pushing
        if kwargs.get("push_to_hub", False) or not self.concept_edits:
            with self._uce_card_options(overwrite=overwrite_model_card, **card):
                return super().save_pretrained(save_directory, *args, **kwargs)
        check_finite_modules({n: m for n, m in self.components.items() if isinstance(m, torch.nn.Module)})
        readme = os.path.join(save_directory, "README.md")
        # The whole folder written aside, then switched with the old one in one step: a save killed at any moment
        # leaves the complete old folder or the complete new one (files of yours in it are kept).
        with atomic_folder(save_directory) as folder:
            result = super().save_pretrained(folder, *args, **kwargs)
            if os.path.isfile(readme):  # the card already there, which the new one replaces only if it may
                shutil.copy2(readme, os.path.join(folder, "README.md"))
            self._uce_write_model_card(folder, "finetune", overwrite=overwrite_model_card, **card)
        return result

    @serialized
    def push_to_hub(self, repo_id: str, *args, fuse_concept_edits: bool = False, overwrite_model_card: bool = False,
                    base_model: str | None = None, license: str | None = None, **kwargs):
        """`push_to_hub`, refusing (before anything is created on the Hub) to push an edit that is not fused.

        Args:
            fuse_concept_edits (`bool`, defaults to `False`): fuse applied edits first instead of refusing.
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the repository with
                the generated card (with the installed plugin; it is kept otherwise, unless it is a card
                diffusers-uce wrote and nobody edited since).
            base_model (`str`, *optional*): the Hub id of the base model (`"owner/name"`) for the card's metadata, when
                the pipeline was loaded from a local folder.
            license (`str`, *optional*): the licence id for the card's metadata.
        """
        card = {"base_model": check_base_model(base_model), "license": check_license(license)}
        self._uce_require_fused(fuse_concept_edits, "push")
        with self._uce_card_options(overwrite=overwrite_model_card, **card):
            return super().push_to_hub(repo_id, *args, **kwargs)

    @contextmanager
    def _uce_card_options(self, **options):
        """Hold the card options of a push for the upload hook, which writes the card (`_uce_push_card`)."""
        self._uce_push_card = options
        try:
            yield
        finally:
            del self._uce_push_card

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

        The plugin's `UCEHubMixin` writes the generated card (`kind`: `"adapter"` or `"finetune"`; `card`: its
        `base_model`, `license`, `repo_id`...), describing the files of the edit the folder holds; the bare mixin,
        which the single-file community pipeline carries, writes none.
        """

"""Solving edits on a pipeline: the target layers, one batched encoding of every prompt, one solve per target group
(UCE, precise erasure, then the hardening rounds), and what the report needs; nothing here changes the pipeline."""

from __future__ import annotations

import torch

from ..core import engine
from ..core.edits import ConceptEdit
from ..core.families import Family, TargetGroup, specialise
from ..core.hardening import hardening_prompts, needs_full_states
from ..core.layerwise import StackedWeights
from ..core.prompts import EncodedPrompts, encode_prompts
from ..core.solve import grouped_grams, homogeneous
from ..core.speed_solve import assemble_speed, full_length_prompts, merge_encoded, solve_speed, speed_prompts
from ..core.targets import expand_names, find_linear_layers, find_projections
from ..utils.checks import all_finite
from .capture import capture_prompts
from .edit_state import EditState, GroupEdit
from .encoding_cache import EncodingCache, encoders_fingerprint


class UCESolverMixin:
    """How a pipeline solves its edits (part of `UCEMixin`): `_uce_solutions` is shared by applying an edit and by
    verifying an edit file."""

    def _uce_solutions(self, records: list[ConceptEdit], groups: list[GroupEdit], held: list[str],
                       report: bool = True):
        """Solve `records` jointly from the original weights of `groups`, without changing the pipeline.

        Returns:
            `tuple[list, list, list]`: per group, the solution, what the report needs (`_uce_report_part`; nothing
            without `report`) and the robustness sums of the hardening replay (`None` where not measured).
        """
        device = self._execution_device
        precise = records[-1].method == "speed"
        refuse_wide(records, groups)
        prompts = (speed_prompts(records) if precise else engine.prompts_of(records)) + held
        prompts += hardening_prompts(records)
        full = full_length_prompts(records) if precise else []  # (captured inputs are always full length)
        last_only = all(r.token_mode == "last" for r in records) and not needs_full_states(records)
        solutions, parts, robust = [], [], []
        for group in groups:  # one solve per target group (one for UNet families, two for FLUX)
            weights, row_layer = group.stacked(device)
            plain = weights[:, :-1] if group.biased else weights
            if full and not group.group.text.captured:  # prompts read at full length are encoded apart, the
                # others stop at their last token
                encodings = [self._uce_encode(group.group, batch, cut, device) for batch, cut in (
                    ([p for p in prompts if p not in full], True), (full, False)) if batch]
                encoded = encodings[0] if len(encodings) == 1 else merge_encoded(*encodings)
            else:
                encoded = self._uce_encode(group.group, prompts, last_only, device)
            if precise:
                assembled, solution = self._uce_solve_precise(group, records, encoded, plain, row_layer)
            else:
                assembled = engine.assemble_terms(records, encoded)
                tokens = len(assembled.terms.erase) + len(assembled.terms.preserve)
                solution = engine.solve(assembled, plain, row_layer, len(group.projections), biased=group.biased,
                                        low_rank=group.takes_low_rank(tokens))
            if not solution.is_finite():
                raise ValueError("the edit solve gave non-finite values; nothing was changed. Lower erase_scale/"
                                 "preserve_scale or raise lamb")
            solution, sums = self._uce_harden(group, weights, solution, records, encoded, measure=report)
            robust.append(sums)
            solutions.append(solution)
            if report:
                parts.append(self._uce_report_part(group, weights, row_layer, solution, assembled, encoded, held,
                                                    records))
        return solutions, parts, robust

    @staticmethod
    def _uce_solve_precise(group: GroupEdit, records, encoded, plain, row_layer):
        """Precise erasure of one group (`method="speed"`); the weights' weakest directions are cached per group."""
        assembled = assemble_speed(records, encoded)
        options = records[-1].method_options
        singular = group.weakest_directions(plain, row_layer) if options["augment"] > 0 else None
        solution, _ = solve_speed(assembled, options, plain, row_layer, len(group.projections), group.biased,
                                  singular)
        return assembled, solution

    def _uce_groups(self, state: EditState) -> list[GroupEdit]:
        """The family's target groups with the layers `state.edit_keys`/`state.layers` select (checked)."""
        family = self._uce_layout()
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
                found = find_linear_layers(component, group.modules, layers=state.layers, context_dim=width,
                                           edit_keys=state.edit_keys)
            if found:
                groups.append(GroupEdit(state, group, found))
        if not groups:
            raise ValueError(f"layers={state.layers!r} selects none of the layers concept editing changes in "
                             f"{family.name} pipelines ({family.named_layers})")
        offloaded = [p.name for g in groups for p in g.projections if p.module.weight.device.type == "meta"]
        if offloaded:
            raise ValueError(
                f"the weights of {offloaded[0]} (and {len(offloaded) - 1} more edited layers) are offloaded to the "
                "meta device (enable_sequential_cpu_offload()), where they cannot be read or edited: edit concepts "
                "before enabling sequential offload, or use enable_model_cpu_offload(), which works with edits")
        return groups

    def _uce_encode(self, group: TargetGroup, prompts: list[str], last_only: bool, device) -> EncodedPrompts:
        """Hidden states of `prompts` as `group`'s layers read them: prompts encoded by an earlier solve come from the
        pipeline's cache (while its text encoders are unchanged), the others from one batched pass per encoder."""
        text = group.text
        encoders = [(getattr(self, tok), getattr(self, enc)) for tok, enc in text.encoders]
        full = not (text.causal and last_only)  # else each prompt is encoded up to its last token only
        cache = self.__dict__.get("_uce_encodings") or self.__dict__.setdefault("_uce_encodings", EncodingCache())
        missing = cache.split(group.name, self._uce_fingerprint(group), prompts, full)
        if missing and text.captured:  # the pipeline's own call, for every captured group at once
            family = self._uce_layout()
            captured = {g.name: g for g in family.groups if g.text.captured}
            for other, encoded in capture_prompts(self, family, list(captured.values()), missing, device).items():
                if other != group.name:
                    cache.split(other, self._uce_fingerprint(captured[other]), [], True)
                cache.store(other, encoded, True)
        elif missing:  # prompts the pipeline has not encoded yet (or not at full length): one batched pass
            encoded = encode_prompts(encoders, missing, causal_cut=not full, output=text.output,
                                     max_length=text.max_length, device=device)
            if not all_finite(encoded.states):
                raise ValueError("the text encoder returned non-finite hidden states; nothing was changed. "
                                 "Check the text encoder's weights and dtype (fp16 overflow?)")
            cache.store(group.name, encoded, full)
        encoded = cache.encoded(group.name, prompts, full)
        cache.trim()
        return encoded

    def _uce_layout(self) -> Family:
        """The pipeline's family, with groups of layers that each read their own input (HiDream's caption
        projections) expanded to one group per layer of this pipeline's denoiser."""
        family = self._uce_family
        missing = tuple(g.component for g in family.groups if g.optional and getattr(self, g.component, None) is None)
        if missing or any(g.per_layer for g in family.groups):
            family = specialise(family, getattr(self, family.groups[0].component), missing)
            self.__dict__["_uce_family"] = family
        return family

    def _uce_fingerprint(self, group: TargetGroup) -> tuple:
        """What the states `group`'s layers read depend on: its text encoders and tokenizers and, for a captured input,
        the denoiser's weights on the text path: every weight of the component but the edited layers' own (which
        fusing changes, and which do not change their own inputs)."""
        fingerprint = encoders_fingerprint([getattr(self, name) for pair in group.text.encoders for name in pair])
        if not group.text.captured:
            return fingerprint
        component = getattr(self, group.component)
        edited = {id(p) for g in self._uce_layout().groups if g.modules and g.component == group.component
                  for name in expand_names(component, g.modules)
                  if isinstance(m := _get(component, name), torch.nn.Module) for p in m.parameters()}
        return fingerprint + tuple((t.data_ptr(), t._version, t.dtype, str(t.device)) for t in component.parameters()
                                   if id(t) not in edited)

    @staticmethod
    def _uce_report_part(group: GroupEdit, weights, row_layer, solution, assembled, encoded, held, records):
        """What `build_report` needs from one group: its Gram matrices (or weights) and its tokens."""
        num_tokens = len(assembled.terms.erase) + len(assembled.terms.preserve) + len(held)
        if solution.layerwise is not None:  # precise erasure: one change per layer, measured on the stacked weights
            grams = StackedWeights(weights, row_layer)
        elif solution.correction is not None:
            grams = grouped_grams(list(weights.split([p.module.weight.shape[0] for p in group.projections])))
        elif 2 * num_tokens < weights.shape[1]:  # few tokens: ‖W_all u‖² directly beats forming W_allᵀW_all
            grams = weights
        else:  # the Gram of the original weights, cached on the group (the robustness report reads it too)
            grams = group.gram(weights.device, weights)[None]
        held_tokens = None
        if held:
            rows = encoded.rows(held)
            index, pos = encoded.preserved(rows, records[-1].token_mode)
            tokens = encoded.states[rows[index], pos].double()
            held_tokens = (held, homogeneous(tokens) if group.biased else tokens, index)
        if group.biased:
            assembled = engine.homogeneous_terms(assembled)
        return grams, solution, assembled, held_tokens


def refuse_wide(records: list[ConceptEdit], groups: list[GroupEdit]) -> None:
    """Refuse what needs a d×d matrix per group (hardening's Gram, precise erasure) on a wide group."""
    wide = [g for g in groups if g.wide]
    if not wide:
        return
    width = wide[0].projections[0].module.weight.shape[1]
    what = ("precise erasure (method='speed')" if records[-1].method == "speed"
            else "hardening (harden=...)" if any(r.harden for r in records) else None)
    if what is not None:
        raise ValueError(f"{what} needs the d×d Gram of each edited layer's input, and {wide[0].group.name} reads "
                         f"{width:,}-wide tokens ({len(wide)} such group(s)), which are edited in low-rank form "
                         "without any d×d matrix; nothing was changed: edit these layers without it (method='uce', "
                         "no harden)")


def _get(component, name: str):
    try:
        return component.get_submodule(name)
    except AttributeError:
        return None

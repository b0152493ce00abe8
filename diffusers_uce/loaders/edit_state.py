"""The state of an applied concept edit (per target group: its layers, solution and undo data) and the methods that
install, fuse, scale and remove it."""

from __future__ import annotations

import torch
from diffusers.utils import logging

from ..core import engine
from ..core.edits import ConceptEdit
from ..core.families import TargetGroup
from ..core.report import EditReport
from ..core.solve import edited_weights, scaled
from ..core.targets import LayerFilter, Projection
from ..utils.checks import finite_number
from .processor import LinearEditHook, ProjectionEdit, UCEAttnProcessor

logger = logging.get_logger(__name__)


class GroupEdit:
    """One target group's part of an applied edit: ``W'_ℓ = W_ℓ T_ℓ`` for its layers.

    A group whose layers have a bias is handled in homogeneous form (`solve.with_bias`): its weights are
    ``[W | b]`` and its solution ``(d+1)×(d+1)``; only ``W`` is ever written, the bias stays as it is.

    Args:
        state (`EditState`): the edit this group belongs to (holds the strength).
        group (`TargetGroup`): which layers and tokens.
        projections (`list[Projection]`): the edited layers, in solve order.
    """

    def __init__(self, state: "EditState", group: TargetGroup, projections: list[Projection]):
        self.state, self.group, self.projections = state, group, projections
        self.biased = any(p.module.bias is not None for p in projections)
        self.solution: engine.Solution | None = None
        self.original_weights: list[torch.Tensor] | None = None  # saved while fused
        self._device_terms: dict = {}
        self.singular: torch.Tensor | None = None  # precise erasure: the weights' weakest input directions (cached)

    def set_solution(self, solution: engine.Solution) -> None:
        self.solution, self._device_terms = solution, {}

    def device_terms(self, device):
        """``Δ = T − I`` and the correction in float32 on `device` (cached), for the processors and hooks; ``Δ`` is
        `None` for a precise-erasure solution (its change is `device_layerwise`)."""
        return self._device_cache(device)[:2]

    def device_layerwise(self, device):
        """The precise-erasure change ``Uᵀ D_ℓ`` in float32 on `device` (cached), or `None`."""
        return self._device_cache(device)[2]

    def _device_cache(self, device):
        if device not in self._device_terms:
            layerwise = self.solution.layerwise
            if layerwise is not None:
                self._device_terms[device] = (None, None, layerwise.to(device, torch.float32))
            else:
                s = self.solution.to(device=device, dtype=torch.float32)
                eye = torch.eye(s.transform.shape[0], device=device)
                self._device_terms[device] = (s.transform - eye, s.correction, None)
        return self._device_terms[device]

    def originals(self) -> list[torch.Tensor]:
        """The unedited weights (``W`` only), whether or not the edit is fused."""
        if self.state.fused:
            return self.original_weights
        return [p.module.weight for p in self.projections]

    def stacked(self, device, weights: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_all`` (or ``[W | b]`` stacked, for a biased group) on `device`, and the layer of each row."""
        return stack(self.originals() if weights is None else weights, self.projections, self.biased, device)

    def fused_weights(self, scale: float, device, solution: engine.Solution | None = None) -> list[torch.Tensor]:
        """New ``W`` of every layer at strength `scale` (of `solution`, the installed one by default), each in its own
        dtype/device; raises if not finite."""
        originals = self.originals()
        weights, row_layer = self.stacked(device)
        s = (solution or self.solution).to(device=weights.device, dtype=weights.dtype)
        if s.layerwise is not None:  # precise erasure: T_ℓ = I + s·Uᵀ D_ℓ
            new = edited_weights(weights, None, None, row_layer, layerwise=s.layerwise.times(scale))
        else:
            transform, correction = scaled(s.transform if s.low_rank is None else s.low_rank, s.correction, scale)
            new = edited_weights(weights, transform, correction, row_layer)
        new = new[:, : originals[0].shape[1]]
        if not all(bool(torch.isfinite(x)) for x in new.aminmax()):  # one reduction (NaN, inf propagate), no copy
            raise ValueError(f"the edit at scale {scale} gives non-finite weights; nothing was changed. Lower the "
                             "erase/preserve scales or the edit scale, or raise lamb")
        sizes = [w.shape[0] for w in originals]
        return [part.to(device=w.device, dtype=w.dtype) for part, w in zip(new.split(sizes), originals)]

    @torch.no_grad()
    def write(self, weights: list[torch.Tensor]) -> None:
        for projection, weight in zip(self.projections, weights):
            projection.module.weight.copy_(weight)


class EditState:
    """Everything an applied edit needs: records, target groups, strength, undo data and the latest report."""

    def __init__(self, edit_keys: bool, layers: LayerFilter):
        self.edit_keys, self.layers = edit_keys, layers
        self.groups: list[GroupEdit] = []
        self.records: list[ConceptEdit] = []
        self.scale = 1.0
        self.fused = False
        self.original_processors: dict[str, object] = {}
        self.hooks: list = []
        self.report: EditReport | None = None  # of the latest solve (None for an edit loaded from a file)

    def snapshot(self) -> tuple:
        """The records, solutions and report now installed, for `restore`."""
        return list(self.records), [g.solution for g in self.groups], self.report

    def matches(self, snapshot: tuple) -> bool:
        """Whether the installed solutions are still those of `snapshot`."""
        return all(g.solution is s for g, s in zip(self.groups, snapshot[1]))

    def restore(self, snapshot: tuple) -> None:
        """Install the records, solutions and report of `snapshot` again (the caller rewrites fused weights)."""
        records, solutions, self.report = snapshot
        self.records = list(records)
        for group, solution in zip(self.groups, solutions):
            group.set_solution(solution)

    @property
    def projections(self) -> list[Projection]:
        """Every edited layer, group after group."""
        return [p for g in self.groups for p in g.projections]

    @property
    def active_scale(self) -> float:
        """Strength the processors and hooks apply: 0 while the edit is fused into the weights."""
        return 0.0 if self.fused else self.scale


def stack(weights: list[torch.Tensor], projections: list[Projection], biased: bool, device):
    """Stack layer weights along rows in float32 (float64 for float64 weights), with the bias column when `biased`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``W_all`` (or ``[W | b]``) and the layer index of each of its rows.
    """
    dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    parts = [w.detach().to(device=device, dtype=dtype) for w in weights]
    if biased:
        parts = [torch.cat([w, (p.module.bias.detach().to(w)[:, None] if p.module.bias is not None
                                else w.new_zeros(w.shape[0], 1))], dim=1) for w, p in zip(parts, projections)]
    sizes = torch.tensor([w.shape[0] for w in weights], device=device)
    return torch.cat(parts), torch.repeat_interleave(torch.arange(len(weights), device=device), sizes)


class UCEEditStateMixin:
    """The applied edit's state and what changes it: install, fuse/unfuse, strength, unload (part of `UCEMixin`).

    Only these methods touch the pipeline's private edit state; everything else reads it through the public
    properties below.
    """

    _uce_state: EditState | None = None

    @property
    def concept_edits(self) -> tuple[ConceptEdit, ...]:
        """The edits applied so far, in order (empty when none)."""
        return tuple(self._uce_state.records) if self._uce_state is not None else ()

    @property
    def concept_edit_scale(self) -> float | None:
        """The strength of the applied edit (`set_concept_edit_scale`), `None` when there is none."""
        return None if self._uce_state is None else self._uce_state.scale

    @property
    def concept_edits_fused(self) -> bool:
        """Whether the applied edit is fused into the weights (`fuse_concept_edits`)."""
        return self._uce_state is not None and self._uce_state.fused

    @property
    def concept_edit_report(self) -> EditReport | None:
        """The report of the latest solve (`None` with no edit, or for an edit loaded from a file)."""
        return None if self._uce_state is None else self._uce_state.report

    @property
    def concept_edit_settings(self) -> dict | None:
        """What every edit shares: `edit_keys`, `layers`, the edited target `groups` (`TargetGroup`s), `scale` and
        `fused`; `None` when there is no edit."""
        state = self._uce_state
        if state is None:
            return None
        return {"edit_keys": state.edit_keys, "layers": state.layers, "groups": tuple(g.group for g in state.groups),
                "scale": state.scale, "fused": state.fused}

    def fuse_concept_edits(self) -> None:
        """Write the applied edit (at its current strength) into the edited weights: no inference overhead.

        `unfuse_concept_edits` undoes it exactly; after fusing, `save_pretrained` writes a plain pipeline that
        vanilla diffusers loads.
        """
        state = self._uce_require_state("fuse")
        if state.fused:
            logger.warning("concept edits are already fused; nothing to do")
            return
        device = self._execution_device
        new = [g.fused_weights(state.scale, device) for g in state.groups]  # all computed before any is written
        for group, weights in zip(state.groups, new):
            group.original_weights = [p.module.weight.detach().clone() for p in group.projections]
            group.write(weights)
        state.fused = True

    def unfuse_concept_edits(self) -> None:
        """Restore the weights saved by `fuse_concept_edits` bit for bit; the edit keeps acting via the processors."""
        state = self._uce_require_state("unfuse")
        if not state.fused:
            logger.warning("concept edits are not fused; nothing to do")
            return
        for group in state.groups:
            group.write(group.original_weights)
            group.original_weights = None
        state.fused = False

    def set_concept_edit_scale(self, scale: float) -> None:
        """Set the strength of the applied edit: 0 off, 1 full, in between partial, above 1 stronger.

        Args:
            scale (`float`): the strength ``s``; the transform becomes ``I + s (T − I)``.
        """
        scale = finite_number(scale, "scale")
        state = self._uce_require_state("scale")
        if state.fused:
            new = [g.fused_weights(float(scale), self._execution_device) for g in state.groups]
            for group, weights in zip(state.groups, new):
                group.write(weights)
        state.scale = float(scale)

    def unload_concept_edits(self) -> None:
        """Remove every concept edit: the original processors and weights come back bit for bit."""
        state = self._uce_state
        if state is None:
            logger.warning("no concept edits to unload")
            return
        for group in state.groups:
            if state.fused:
                group.write(group.original_weights)
            component = getattr(self, group.group.component)
            for name, processor in state.original_processors.get(group.group.name, {}).items():
                component.get_submodule(name).set_processor(processor)
        for handle in state.hooks:
            handle.remove()
        self._uce_state = None

    def _uce_snapshot(self):
        """What `_uce_restore` needs to put back the edits applied now (`None` when there are none)."""
        return None if self._uce_state is None else self._uce_state.snapshot()

    def _uce_restore(self, snapshot) -> None:
        """Put back the edits of a `_uce_snapshot` (unload them all for `None`), if anything changed since."""
        state = self._uce_state
        if state is None or (snapshot is not None and state.matches(snapshot)):
            return
        logger.warning("restoring the concept edits applied before the failed call")
        if snapshot is None:
            return self.unload_concept_edits()
        state.restore(snapshot)
        if state.fused:
            self.set_concept_edit_scale(state.scale)  # rewrites the fused weights from the originals

    def _uce_require_state(self, action: str) -> EditState:
        if self._uce_state is None:
            raise ValueError(f"no concept edits to {action}: call apply_concept_edits() first")
        return self._uce_state

    def _uce_set_edit(self, groups: list[GroupEdit], records: list[ConceptEdit], solutions: list[engine.Solution],
                      fused_weights: list | None = None) -> EditState:
        """Install a validated, solved edit: the one place where applying or loading changes the pipeline.

        Args:
            groups (`list[GroupEdit]`): the edited target groups, of the installed state or of a new one.
            records (`list[ConceptEdit]`): all edit records, now solved jointly.
            solutions (`list[engine.Solution]`): their solution per group, at strength 1.
            fused_weights (`list[list[torch.Tensor]]`, *optional*): new weights per group, when the edit is fused.
        """
        state = groups[0].state
        if self._uce_state is None:
            state.groups = list(groups)
            self._uce_install(state)
            self._uce_state = state
        state.records = list(records)
        for group, solution in zip(state.groups, solutions):
            group.set_solution(solution)
        state.report = None
        if fused_weights is not None:
            for group, weights in zip(state.groups, fused_weights):
                group.write(weights)
        return state

    def _uce_install(self, state: EditState) -> None:
        """Processors on cross-attention groups, forward hooks on other layers: the edit acts, weights untouched."""
        for group in state.groups:
            component = getattr(self, group.group.component)
            if not group.group.cross_attention:
                state.hooks += [p.module.register_forward_hook(LinearEditHook(ProjectionEdit(group, i)))
                                for i, p in enumerate(group.projections)]
                continue
            edits: dict[str, dict[str, ProjectionEdit]] = {}
            for index, projection in enumerate(group.projections):
                edits.setdefault(projection.attention, {})[projection.kind] = ProjectionEdit(group, index)
            originals = state.original_processors.setdefault(group.group.name, {})
            for name, kinds in edits.items():
                attention = component.get_submodule(name)
                originals[name] = attention.processor
                attention.set_processor(UCEAttnProcessor(attention.processor, kinds.get("to_k"), kinds.get("to_v")))

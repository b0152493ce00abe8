"""What installs, fuses, scales and removes a pipeline's concept edit, under the pipeline's lock: the only code that
changes the edit state (`UCEEditStateMixin`, part of `UCEMixin`)."""

from __future__ import annotations

import functools
import threading

from diffusers.utils import logging

from ..core import engine
from ..core.edits import ConceptEdit
from ..core.report import EditReport
from ..utils.checks import finite_number
from . import installed
from .edit_state import EditState, GroupEdit

logger = logging.get_logger(__name__)


MAX_EDIT_SCALE = 10.0


def check_edit_scale(scale, name: str = "scale") -> float:
    """A concept edit's strength as a float, within ``[-MAX_EDIT_SCALE, MAX_EDIT_SCALE]``."""
    scale = finite_number(scale, name)
    if abs(scale) > MAX_EDIT_SCALE:
        raise ValueError(f"{name} must be between -{MAX_EDIT_SCALE:g} and {MAX_EDIT_SCALE:g} (1 is the full edit, 0 "
                         f"none, negative reverses it), got {scale:g}")
    return scale


def serialized(method):
    """Run a method that reads or changes a pipeline's concept edit under the pipeline's own lock.

    Two threads editing one pipeline then take turns: both edits take effect (the second is solved jointly with the
    first), and a fuse, strength change or unload never interleaves with another. The lock is re-entrant, so these
    methods may call each other.
    """

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        lock = self.__dict__.get("_uce_lock") or self.__dict__.setdefault("_uce_lock", threading.RLock())
        with lock:
            return method(self, *args, **kwargs)

    return locked


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
        """What every edit shares: `edit_keys`, `layers`, the edited target `groups` (`TargetGroup`s), `edited` (the
        name of every edited projection, `"<component>.<module>"`), `scale` and `fused`; `None` when there is no
        edit."""
        state = self._uce_state
        if state is None:
            return None
        return {"edit_keys": state.edit_keys, "layers": state.layers, "groups": tuple(g.group for g in state.groups),
                "edited": tuple(f"{g.group.component}.{p.name}" for g in state.groups for p in g.projections),
                "scale": state.scale, "fused": state.fused}

    @serialized
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

    @serialized
    def unfuse_concept_edits(self) -> None:
        """Restore the weights saved by `fuse_concept_edits` bit for bit; the edit keeps acting via the processors."""
        state = self._uce_require_state("unfuse")
        if not state.fused:
            logger.warning("concept edits are not fused; nothing to do")
            return
        self._uce_carry_over()
        for group in state.groups:
            group.write(group.original_weights)
            group.original_weights = None
        state.fused = False

    @serialized
    def set_concept_edit_scale(self, scale: float) -> None:
        """Set the strength of the applied edit: 0 off, 1 full, in between partial, above 1 stronger.

        A strength above 1 extrapolates the edit (erased concepts move past their guides); a negative one reverses
        it (erased concepts move away from their guides: they come out stronger). Strengths are bounded to
        ``[-MAX_EDIT_SCALE, MAX_EDIT_SCALE]`` (10), far beyond what is useful, so that no strength overflows.

        Args:
            scale (`float`): the strength ``s``; the transform becomes ``I + s (T − I)``.
        """
        scale = check_edit_scale(scale)
        state = self._uce_require_state("scale")
        for group in state.groups:
            group.check_acts_finitely(scale)
        if state.fused:
            self._uce_carry_over()
            new = [g.fused_weights(float(scale), self._execution_device) for g in state.groups]
            for group, weights in zip(state.groups, new):
                group.write(weights)
        state.scale = float(scale)

    @serialized
    def unload_concept_edits(self) -> None:
        """Remove every concept edit: the original processors and weights come back bit for bit."""
        state = self._uce_state
        if state is None:
            logger.warning("no concept edits to unload")
            return
        self._uce_carry_over()
        for group in state.groups:
            if state.fused:
                group.write(group.original_weights)
            component = getattr(self, group.group.component)
            for name, processor in state.original_processors.get(group.group.name, {}).items():
                component.get_submodule(name).set_processor(processor)
        installed.remove(state)
        self._uce_state = None

    def _uce_carry_over(self) -> None:
        """While the edit is fused, keep a change made to the edited weights since it was written into them (a LoRA
        merged with `fuse_lora()`): what unfusing and unloading restore, and what a new strength or solve starts
        from, is then the original weights plus that change (`GroupEdit.carry_over_change`)."""
        state = self._uce_state
        if state is None or not state.fused:
            return
        changed = [g.group.name for g in state.groups if g.carry_over_change(state.scale, self._execution_device)]
        if changed:
            logger.warning(f"the weights of the edited layers ({', '.join(changed)}) changed since "
                           "fuse_concept_edits() (a LoRA fused into them?): the change is kept, and unfusing or "
                           "unloading the concept edits now restores the original weights plus that change")

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
        for group, solution in zip(groups, solutions):
            group.check_acts_finitely(state.scale, solution)
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
        """Processors on cross-attention groups, forward hooks on other layers: the edit acts, weights untouched;
        and the check (`_uce_check_installed`) before every call of the edited components."""
        installed.install(self, state)

    @serialized
    def _uce_check_installed(self) -> None:
        """Before the denoiser runs, in any pipeline built from these components: make sure the applied edit still
        acts (`installed.check_installed`): a processor or hook replaced since gets the edit back, a layer replaced by
        a plain linear layer with the same weights takes it over (both with a warning); projections fused since
        (`fuse_qkv_projections`) or a layer replaced by another one raise with what to do."""
        state = self._uce_state
        if state is None:
            return
        if not state.fused:
            for group in state.groups:  # the device terms exist before a compiled denoiser traces the processors,
                group.device_terms(self._execution_device)  # so filling their cache there causes no recompilation
        installed.check_installed(self, state)

"""The state of an applied concept edit: per target group, its layers, solution and undo data."""

from __future__ import annotations

import torch

from ..core import engine
from ..core.edits import ConceptEdit
from ..core.families import TargetGroup
from ..core.precise import smallest_right_singular_vectors
from ..core.report import EditReport
from ..core.robust import stacked_gram
from ..core.solve import edited_weights, scaled
from ..core.targets import LayerFilter, Projection
from ..core.wide import is_wide, takes_low_rank
from ..utils.checks import all_finite
from ..utils.fingerprint import fingerprint, same_fingerprint


class GroupEdit:
    """One target group's part of an applied edit: ``W'_ℓ = W_ℓ T_ℓ`` for its layers.

    A group whose layers have a bias that the targets include (FLUX.1, as the authors' script) is handled in
    homogeneous form (`solve.with_bias`): its weights are ``[W | b]`` and its solution ``(d+1)×(d+1)``; only ``W`` is
    ever written, the bias stays as it is.

    Args:
        state (`EditState`): the edit this group belongs to (holds the strength).
        group (`TargetGroup`): which layers and tokens.
        projections (`list[Projection]`): the edited layers, in solve order.
    """

    def __init__(self, state: "EditState", group: TargetGroup, projections: list[Projection]):
        self.state, self.group, self.projections = state, group, projections
        # The authors' FLUX.1 script puts the bias into the targets (solved in homogeneous form); elsewhere a bias
        # is a constant the edit leaves alone, so it cancels out of every target and is not part of the solve.
        self.biased = group.bias_in_targets and any(p.module.bias is not None for p in projections)
        self.solution: engine.Solution | None = None
        self.original_weights: list[torch.Tensor] | None = None  # saved while fused
        self._device_terms: dict = {}
        # Caches of what depends on the original weights only, each with the fingerprint of the weights it was
        # computed from: weights changed in place since (a merged LoRA, load_state_dict) are never read stale.
        self._gram: tuple | None = None  # (fingerprint, G)
        self._singular: tuple | None = None  # (fingerprint, weakest input direction of each layer), precise erasure
        self.written: list | None = None  # fingerprint of the weights `write` wrote last

    @property
    def wide(self) -> bool:
        """Whether the layers read inputs too wide for d×d algebra (`wide.is_wide`; never for a biased group)."""
        return not self.biased and is_wide(self.projections[0].module.weight.shape[1], self.group.layer_group)

    def takes_low_rank(self, num_tokens: int) -> bool:
        """Whether an edit with `num_tokens` erased and preserved tokens is solved in low-rank form here: a wide
        group with fewer tokens than half its width (`wide.takes_low_rank`)."""
        width = self.projections[0].module.weight.shape[1]
        return not self.biased and takes_low_rank(width, num_tokens, self.group.layer_group)

    def set_solution(self, solution: engine.Solution) -> None:
        self.solution, self._device_terms = solution, {}

    def device_terms(self, device):
        """``Δ = T − I`` and the correction in float32 on `device` (cached), for the processors and hooks; ``Δ`` is
        `None` for a precise-erasure or low-rank solution (its change is `device_layerwise`)."""
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
        if not all_finite(new):
            raise ValueError(f"the edit at scale {scale} gives non-finite weights; nothing was changed. Lower the "
                             "erase/preserve scales or the edit scale, or raise lamb")
        sizes = [w.shape[0] for w in originals]
        out = [part.to(device=w.device, dtype=w.dtype) for part, w in zip(new.split(sizes), originals)]
        if not all_finite(*(o for o, w in zip(out, originals) if w.dtype != new.dtype)):  # e.g. beyond float16's range
            raise ValueError(f"the edit at scale {scale} overflows the weights' dtype {originals[0].dtype}; nothing "
                             "was changed. Lower the edit scale, or fuse in a wider dtype")
        return out

    def check_acts_finitely(self, scale: float, solution: engine.Solution | None = None) -> None:
        """Raise unless the edit at strength `scale` is finite in float32, the precision the processors and hooks
        apply it in (an entry of 1e39 is finite in float64, not in float32), before anything is installed."""
        s = (solution or self.solution).to(dtype=torch.float32)
        delta = None
        if s.transform is not None:  # (a low-rank solution has none: its change is `layerwise`)
            delta = scale * (s.transform - torch.eye(s.transform.shape[0], dtype=torch.float32,
                                                     device=s.transform.device))
        change = engine.Solution(delta, None if s.correction is None else s.correction.times(
            scale), layerwise=None if s.layerwise is None else s.layerwise.times(scale))
        if not change.is_finite():
            raise ValueError(f"the concept edit at strength {scale:g} is not finite in float32, the precision it is "
                             "applied in; nothing was changed. Lower the strength, or re-solve the edit (was the "
                             "edit file changed?)")

    def weights_fingerprint(self) -> list[torch.Tensor]:
        """`fingerprint` of the original weights (and biases, which a biased group's solve reads too)."""
        biases = [p.module.bias for p in self.projections] if self.biased else []
        return fingerprint([*self.originals(), *biases])

    def gram(self, device, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``G = W_allᵀ W_all`` of the original weights on `device`, float64, cached while the original weights are
        unchanged (their fingerprint is compared at each call). `weights`: the stacked original weights (`stacked`)
        when the caller has them; otherwise they are stacked here, only when ``G`` is not cached. Chunk products run
        in float32 unless the weights are float64."""
        device = torch.empty(0, device=device).device  # with its index, as a tensor's device
        key = self.weights_fingerprint()
        if self._gram is None or self._gram[1].device != device or not same_fingerprint(self._gram[0], key):
            weights = self.stacked(device)[0] if weights is None else weights
            compute = torch.float64 if weights.dtype == torch.float64 else torch.float32
            self._gram = key, stacked_gram(weights, compute_dtype=compute)
        return self._gram[1]

    def weakest_directions(self, plain: torch.Tensor, row_layer: torch.Tensor) -> torch.Tensor:
        """The right singular vector of each layer's original weights with the smallest singular value (precise
        erasure's augmentation), cached while the original weights are unchanged. `plain`: the stacked weights."""
        key = self.weights_fingerprint()
        if self._singular is None or not same_fingerprint(self._singular[0], key):
            self._singular = key, smallest_right_singular_vectors(plain, row_layer, len(self.projections))
        return self._singular[1].to(plain.device)

    def carry_over_change(self, scale: float, device) -> bool:
        """While the edit is fused: if the weights changed since it was written into them (a LoRA fused into them,
        `load_state_dict`), keep that change, ``W_orig ← W_orig + (W_now − W_fused)``, so that unfusing, unloading, a
        new strength or a new solve start from the changed weights instead of discarding the change. Nothing is
        written. Returns whether there was a change."""
        if self.original_weights is None:
            return False
        current = [p.module.weight.detach() for p in self.projections]
        now = fingerprint(current)
        if same_fingerprint(self.written, now):
            return False
        fused = self.fused_weights(scale, device)
        self.original_weights = [
            (o.to(w.device, torch.float64) + (w.double() - f.to(w.device, torch.float64))).to(o.device, o.dtype)
            for o, w, f in zip(self.original_weights, current, fused)]
        self.written = now
        return True

    @torch.no_grad()
    def write(self, weights: list[torch.Tensor]) -> None:
        for projection, weight in zip(self.projections, weights):
            projection.module.weight.copy_(weight)
        self.written = fingerprint(p.module.weight for p in self.projections)


class EditState:
    """Everything an applied edit needs: records, target groups, strength, undo data and the latest report."""

    def __init__(self, edit_keys: bool, layers: LayerFilter):
        self.edit_keys, self.layers = edit_keys, layers
        self.groups: list[GroupEdit] = []
        self.records: list[ConceptEdit] = []
        self.scale = 1.0
        self.fused = False
        self.original_processors: dict[str, object] = {}
        self.hooks: list = []  # forward hooks of the edited layers that are not cross-attention projections
        self.checks: dict = {}  # forward pre-hook of each edited component (`installed.DenoiserCheck`)
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

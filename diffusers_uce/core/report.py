"""The edit report: how well an edit did what it was asked, measured on keys/values (no images needed).

- efficacy of an erased concept: ``1 − ‖W' C − W C*‖ / ‖W C − W C*‖`` over its tokens and all edited layers. 1 means
its
  edited keys/values are exactly its guide's original ones, 0 means they did not move toward the guide.
- interference of a preserved or held-out concept: ``‖W' P − W P‖ / ‖W P‖``, the relative change of its keys/values.
- precise erasure also reports the relative change of each invariant token (≈ 0) and the retain prompts dropped for
  naming an erased concept; its preserved concepts are the retain set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch

from .layerwise import StackedWeights, layerwise_distances
from .solve import output_distances

# Generic concepts used to measure interference on what was neither erased nor preserved.
DEFAULT_HOLDOUT_CONCEPTS = (
    "a photo of a dog", "a cat", "a red car", "a house in the woods", "a portrait of a woman",
    "a city street at night",
    "a mountain landscape", "a bowl of fruit", "a sailing boat", "a bird on a branch",
)


@dataclass
class EditReport:
    """Per-concept numbers of an edit, aggregated over every edited layer (all at strength 1).

    Args:
        erased (`list[dict]`): ``{"concept", "guide", "efficacy"}`` per erased concept.
        preserved (`list[dict]`): ``{"concept", "interference"}`` per preserved concept.
        held_out (`list[dict]`): ``{"concept", "interference"}`` per held-out concept.
        debiased (`list[dict]`): ``{"concept", "shift"}`` per debiased concept: the relative change of its
            keys/values.
        ratios (`list[dict]`): filled by the debias loop: ``{"concept", "attributes", "target", "before",
            "after", "iterations", "reached", "weights", "history", "seeds"}`` per concept and attribute set.
        layers (`int`): number of edited projections.
        robustness (`list[dict]`): per erased concept, what an attacker who controls the text embedding gets back:
            ``{"concept", "guide", "reg", "rounds", "tokens", "recovery", "norm_ratio"}``, where `recovery` and
            `norm_ratio` hold one value before hardening and one after each round (a single value for an edit that
            is not hardened, measured at ``ρ = 0.1``). Recovery ``1 − ‖W'c' − Wc‖ / ‖Wc − Wc*‖``: 1 means the
            attacker's embedding ``c'`` gives the concept's original keys/values back exactly, 0 only the guide's;
            norm ratio ``‖c'‖ / ‖c‖``: how far from ordinary embeddings the attacker must go.
        invariants (`list[dict]`): precise erasure: ``{"token", "change"}`` per invariant token, its relative change.
        retain_dropped (`list[str]`): precise erasure: retain prompts left out because they name an erased concept.
        demo (`bool`): the edited pipeline is a built-in demo pipeline with random weights (the printed report and
            model cards then say that its numbers mean nothing for a real model).
    """

    erased: list[dict] = field(default_factory=list)
    preserved: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    debiased: list[dict] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
    layers: int = 0
    robustness: list[dict] = field(default_factory=list)
    invariants: list[dict] = field(default_factory=list)
    retain_dropped: list[str] = field(default_factory=list)
    demo: bool = False

    def summary(self) -> dict:
        mean = lambda rows, key: (sum(r[key] for r in rows) / len(rows)) if rows else None  # noqa: E731
        return {
            "mean_efficacy": mean(self.erased, "efficacy"),
            "mean_preserved_interference": mean(self.preserved, "interference"),
            "mean_held_out_interference": mean(self.held_out, "interference"),
            "max_invariant_change": max((r["change"] for r in self.invariants), default=None),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict) -> "EditReport":
        """The report of a `to_dict()` (its `summary` is recomputed, other keys are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None})

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        from .report_text import report_text

        return report_text(self)

    def plot(self, **kwargs):
        """A matplotlib figure of the report (needs matplotlib: `pip install matplotlib`); see
        `diffusers_uce.core.report_plot.plot_report` for the panels and arguments."""
        from .report_plot import plot_report

        return plot_report(self, **kwargs)


def _per_group(values: torch.Tensor, group: torch.Tensor, count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def _distances(grams, transform, correction, x, y, layerwise=None) -> torch.Tensor:
    """`solve.output_distances`, or its per-layer form for a precise-erasure change (`grams` the stacked weights)."""
    if isinstance(grams, StackedWeights):
        if layerwise is not None:
            return layerwise_distances(grams, layerwise, x, y)
        grams = grams.weights
    return output_distances(grams, transform, correction, x, y)


def _changes(grams, transform, correction, tokens, layerwise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_ℓ ‖W'_ℓ p − W_ℓ p‖²`` and ``Σ_ℓ ‖W_ℓ p‖²`` per token."""
    return (_distances(grams, transform, correction, tokens, tokens, layerwise),
            _distances(grams, None, None, tokens, torch.zeros_like(tokens)))


def build_report(parts, layers: int) -> EditReport:
    """Compute the report from the layers' Gram matrices ``W_ℓᵀ W_ℓ`` (summed to one when all layers share ``T``).

    Squared distances are summed over the layers of every target group before the ratios are taken, so a family
    with several groups (FLUX) gets one number per concept.

    Args:
        parts (`list[tuple]`): one ``(grams, solution, assembled, held_out)`` per target group:
            grams (`torch.Tensor`): ``(L, d, d)`` float64 Gram matrices (``L = 1`` for a summed Gram), or the stacked
            weights ``W_all`` when every layer shares the transform (see `solve.output_distances`);
            solution (`engine.Solution`): the solved edit at strength 1;
            assembled (`engine.AssembledTerms`): tokens and their concepts (the same concepts in every group);
            held_out (`tuple[list[str], torch.Tensor, torch.Tensor]` or `None`): held-out concept names, their
            tokens and the concept index of each token.
        layers (`int`): number of edited layers.
    """
    sums: dict[str, torch.Tensor] = {}

    def add(key, values, group, count):
        total = _per_group(values, group, count)
        sums[key] = sums[key] + total if key in sums else total

    invariant_changes = []
    for grams, solution, assembled, held_out in parts:
        t, c, terms, lw = solution.transform, solution.correction, assembled.terms, solution.layerwise
        num_pairs, n = len(assembled.pairs), len(assembled.token_pair)  # debiased concepts' tokens follow the pairs'
        erased, guides = terms.erase[:n], terms.guide[:n]
        add("moved", _distances(grams, t, c, erased, guides, lw), assembled.token_pair, num_pairs)
        add("gap", _distances(grams, None, None, erased, guides), assembled.token_pair, num_pairs)
        debiased = terms.erase[n:]
        groups = [("debiased", debiased, torch.arange(len(debiased), device=debiased.device), len(debiased)),
                  ("preserved", terms.preserve, assembled.token_preserved, len(assembled.preserved))]
        if held_out is not None and held_out[0]:
            groups.append(("held_out", held_out[1], held_out[2], len(held_out[0])))
        if assembled.invariants is not None:  # per group: each group has its own invariant tokens
            change, base = _changes(grams, t, c, assembled.invariants.to(terms.erase), lw)
            invariant_changes.extend((change / base.clamp_min(torch.finfo(base.dtype).tiny)).sqrt().tolist())
        for key, tokens, group, count in groups:
            if count:
                change, base = _changes(grams, t, c, tokens, lw)
                add(key, change, group, count)
                add(key + "_base", base, group, count)

    assembled, held_out = parts[0][2], parts[0][3]
    ratio = lambda key: (sums[key] / sums[key + "_base"]).sqrt().tolist()  # noqa: E731
    report = EditReport(
        erased=[{"concept": e, "guide": g, "efficacy": v}
                for (e, g), v in zip(assembled.pairs, (1 - (sums["moved"] / sums["gap"]).sqrt()).tolist())],
        layers=layers,
    )
    if "debiased" in sums:
        report.debiased = [{"concept": p, "shift": v} for p, v in zip(assembled.debiased_concepts, ratio("debiased"))]
    if "preserved" in sums:
        report.preserved = [{"concept": p, "interference": v} for p, v in zip(assembled.preserved, ratio("preserved"))]
    if "held_out" in sums:
        report.held_out = [{"concept": p, "interference": v} for p, v in zip(held_out[0], ratio("held_out"))]
    if assembled.invariants is not None:  # (FLUX: the tokens of both groups, one after the other)
        report.invariants = [{"token": i, "change": v} for i, v in enumerate(invariant_changes)]
        report.retain_dropped = list(assembled.retain_dropped)
    return report

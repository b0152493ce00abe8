"""The edit report: how well an edit did what it was asked, measured on keys/values (no images needed).

- efficacy of an erased concept: ``1 − ‖W' C − W C*‖ / ‖W C − W C*‖`` over its tokens and all edited layers. 1 means its
  edited keys/values are exactly its guide's original ones, 0 means they did not move toward the guide.
- interference of a preserved or held-out concept: ``‖W' P − W P‖ / ‖W P‖``, the relative change of its keys/values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .solve import output_distances

# Generic concepts used to measure interference on what was neither erased nor preserved.
DEFAULT_HOLDOUT_CONCEPTS = (
    "a photo of a dog", "a cat", "a red car", "a house in the woods", "a portrait of a woman", "a city street at night",
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
    """

    erased: list[dict] = field(default_factory=list)
    preserved: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    debiased: list[dict] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
    layers: int = 0

    def summary(self) -> dict:
        mean = lambda rows, key: (sum(r[key] for r in rows) / len(rows)) if rows else None  # noqa: E731
        return {
            "mean_efficacy": mean(self.erased, "efficacy"),
            "mean_preserved_interference": mean(self.preserved, "interference"),
            "mean_held_out_interference": mean(self.held_out, "interference"),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        rows = [("erased", r["concept"], f"→ {r['guide'] or '<unconditional>'}", "efficacy", r["efficacy"])
                for r in self.erased]
        rows += [(kind, r["concept"] or "<unconditional>", "", "interference", r["interference"])
                 for kind, part in (("preserved", self.preserved), ("held-out", self.held_out)) for r in part]
        rows += [("debiased", r["concept"], "", "shift", r["shift"]) for r in self.debiased]
        rows += [("ratio", r["concept"], f"{a} (target {t:.2f}, before {b:.2f})", "after", x)
                 for r in self.ratios for a, t, b, x in zip(r["attributes"], r["target"], r["before"], r["after"])]
        widths = [max([len(str(r[i])) for r in rows] + [len(h)]) for i, h in
                  enumerate(("role", "concept", "guide", "metric"))]
        header = ("role", "concept", "guide", "metric", "value")
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths + [0])).rstrip()]
        lines.append("  ".join("-" * w for w in widths + [6]))
        for row in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + f"  {row[4]:.4f}")
        s = self.summary()
        lines.append(f"{self.layers} projections edited; mean efficacy {_fmt(s['mean_efficacy'])}, "
                     f"mean interference preserved {_fmt(s['mean_preserved_interference'])}, "
                     f"held-out {_fmt(s['mean_held_out_interference'])}")
        return "\n".join(lines)


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def _per_group(values: torch.Tensor, group: torch.Tensor, count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def relative_change(grams, transform, correction, tokens, group, count) -> list[float]:
    """``‖W' P − W P‖ / ‖W P‖`` per group of tokens (a concept's tokens), summed over layers."""
    change = _per_group(output_distances(grams, transform, correction, tokens, tokens), group, count)
    base = _per_group(output_distances(grams, torch.zeros_like(transform), None, tokens, -tokens), group, count)
    return (change / base).sqrt().tolist()


def build_report(grams, solution, assembled, layers: int, held_out=None) -> EditReport:
    """Compute the report from the layers' Gram matrices ``W_ℓᵀ W_ℓ`` (summed to one when all layers share ``T``).

    Args:
        grams (`torch.Tensor`): ``(L, d, d)`` float64 Gram matrices (``L = 1`` for a summed Gram), or the stacked
            weights ``W_all`` when every layer shares the transform (see `solve.output_distances`).
        solution (`engine.Solution`): the solved edit at strength 1.
        assembled (`engine.AssembledTerms`): tokens and their concepts.
        layers (`int`): number of edited projections.
        held_out (`tuple[list[str], torch.Tensor, torch.Tensor]`, *optional*): held-out concept names, their tokens
            and the concept index of each token.
    """
    t, c, terms = solution.transform, solution.correction, assembled.terms
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    num_pairs, n = len(assembled.pairs), len(assembled.token_pair)  # debiased concepts' tokens follow the pairs'
    erased, guides = terms.erase[:n], terms.guide[:n]
    moved = _per_group(output_distances(grams, t, c, erased, guides), assembled.token_pair, num_pairs)
    gap = _per_group(output_distances(grams, eye, None, erased, guides), assembled.token_pair, num_pairs)
    efficacy = (1 - (moved / gap).sqrt()).tolist()
    report = EditReport(
        erased=[{"concept": e, "guide": g, "efficacy": v} for (e, g), v in zip(assembled.pairs, efficacy)],
        layers=layers,
    )
    debiased = terms.erase[n:]
    if len(debiased):
        values = relative_change(grams, t, c, debiased, torch.arange(len(debiased), device=debiased.device),
                                 len(debiased))
        report.debiased = [{"concept": p, "shift": v} for p, v in zip(assembled.debiased_concepts, values)]
    if assembled.preserved:
        values = relative_change(grams, t, c, terms.preserve, assembled.token_preserved, len(assembled.preserved))
        report.preserved = [{"concept": p, "interference": v} for p, v in zip(assembled.preserved, values)]
    if held_out is not None and held_out[0]:
        names, tokens, group = held_out
        values = relative_change(grams, t, c, tokens, group, len(names))
        report.held_out = [{"concept": p, "interference": v} for p, v in zip(names, values)]
    return report

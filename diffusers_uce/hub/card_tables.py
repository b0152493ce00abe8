"""What a model card's tables and lists show: the edit records, the edit report and the edited projections, as
markdown-safe text for the card template (`cards.render_model_card`)."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from ..core.report import EditReport

MAX_REPORT_ROWS = 24
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md(value: Any) -> str:
    """Text safe inside a markdown table cell."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else md(value)


def _concept(text: str) -> str:
    return md(text) if text and text.strip() else "*unconditional*"


def names(values: Sequence[str], limit: int = 3) -> str:
    """The first `limit` concepts, markdown-safe, and how many more there are."""
    shown = ", ".join(_concept(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def erased_concepts(edits: list[dict]) -> list[str]:
    """Every erased concept of the edit records, in order."""
    out = []
    for edit in edits:
        out += [edit["erase"]] if isinstance(edit.get("erase"), str) else list(edit.get("erase") or ())
    return out


def edit_row(index: int, data: Mapping) -> dict[str, str]:
    """One row of the card's edit table: an edit record's concepts, scales, token mode and technique."""
    erase = [data["erase"]] if isinstance(data.get("erase"), str) else list(data.get("erase") or ())
    guide = data.get("guide")
    guides = [guide] * len(erase) if guide is None or isinstance(guide, str) else list(guide)
    guides = guides * len(erase) if len(guides) == 1 else guides
    preserve = [data["preserve"]] if isinstance(data.get("preserve"), str) else list(data.get("preserve") or ())
    return {
        "index": str(index),
        "pairs": "; ".join(f"{_concept(e)} → {_concept(g or '')}" for e, g in zip(erase, guides + [""] * len(erase))),
        "preserved": "; ".join(_concept(p) for p in preserve),
        **{key: _number(data[key]) if data.get(key) is not None else "—"
           for key in ("erase_scale", "preserve_scale", "lamb")},
        **{key: md(data[key]) if data.get(key) else "—" for key in ("token_mode", "technique")},
        **_harden_cell(data.get("technique"), data.get("harden")),
        **(_precise_row(data, preserve) if data.get("method", "uce") != "uce" else {}),
    }


def _harden_cell(technique, harden) -> dict:
    """A hardened edit's technique cell also gives its rounds and ``ρ`` (e.g. "replace, hardened: 3 rounds, ρ 0.1")."""
    if not harden:
        return {}
    rounds = harden.get("rounds")
    return {"technique": f"{md(technique or 'replace')}, hardened: {rounds} round{'s' * (rounds != 1)}, "
                         f"ρ {_number(harden.get('reg'))} ({md(harden.get('tokens'))} tokens)"}


def _precise_row(data: Mapping, preserve: list[str]) -> dict[str, str]:
    """A precise-erasure record's cells: its method and options in the technique column, its retain set summed up."""
    options = ", ".join(f"{k}={v if k != 'invariants' or isinstance(v, str) else f'{len(v)} tokens'}"
                        for k, v in (data.get("method_options") or {}).items())
    retain = f"retain set of {len(preserve)}: {names(preserve)}" if preserve else "retain: \"\""
    return {"preserved": retain, "erase_scale": "—", "preserve_scale": "—", "lamb": "—",
            "technique": md(f"{data['method']} ({options})")}


def report_view(report: Any, plot: str | None = None) -> dict | None:
    """The numbers the template shows, from `EditReport.to_dict()` (or an `EditReport`/`ConceptEditOutput`);
    `plot` is the file name of the report's picture next to the card, if one is saved there."""
    report = getattr(report, "report", report)
    if report is None or (isinstance(report, Mapping) and not report):
        return None
    report = EditReport.from_dict(report.to_dict() if hasattr(report, "to_dict") else dict(report))
    summary = report.summary()
    erased, preserved, held = report.erased, report.preserved, report.held_out
    fmt = lambda x: None if x is None else f"{x:.4f}"  # noqa: E731
    rows = [{"role": "erased", "concept": _concept(r["concept"]), "guide": "→ " + _concept(r.get("guide") or ""),
             "metric": "efficacy", "value": fmt(r["efficacy"])} for r in erased]
    rows += [{"role": role, "concept": _concept(r["concept"]), "guide": "", "metric": "interference",
              "value": fmt(r["interference"])} for role, part in (("preserved", preserved), ("held-out", held))
             for r in part]
    robust_rows = [{"concept": _concept(r["concept"]), "reg": _number(r["reg"]), "rounds": str(r["rounds"]),
                    "recovery": " → ".join(f"{v:.2f}" for v in r["recovery"]),
                    "norm_ratio": f"{r['norm_ratio'][-1]:.2f}"} for r in report.robustness]
    hidden = len(rows) - MAX_REPORT_ROWS
    return {
        "mean_efficacy": fmt(summary["mean_efficacy"]),
        "mean_preserved": fmt(summary["mean_preserved_interference"]),
        "mean_held_out": fmt(summary["mean_held_out_interference"]),
        "max_invariant_change": fmt(summary.get("max_invariant_change")),
        "layers": str(report.layers) if report.layers else None,
        "rows": rows[:MAX_REPORT_ROWS],
        "more": f"*… and {hidden} more rows.*" if hidden > 0 else None,
        "robust_rows": robust_rows,
        "ratios": bool(report.ratios),
        "demo": report.demo,
        "plot": plot,
    }


def edit_options_line(settings: Mapping) -> str:
    """The card's line on the edited layers and the strength of an edit: `groups` (`TargetGroup`s), `layers`,
    `edit_keys` and `scale`, as `pipe.concept_edit_settings` gives them (or as an edit file records them)."""
    parts = []
    for group in settings["groups"]:
        if group.modules:
            parts += [f"`{group.component}.{module}`" for module in group.modules]
            continue
        layers = settings["layers"]
        scope = ("every cross-attention layer" if layers is None else "the cross-attention layers chosen by a filter"
                 if callable(layers) else "the cross-attention layers matching " + names(list(map(str, layers))))
        keys = '`to_k` and `to_v`' if settings["edit_keys"] else '`to_v`'
        parts.append(f"{keys} of {md(scope) if callable(layers) or layers is None else scope}")
    return f"Edited projections: {'; '.join(parts)}; strength {settings['scale']:g}."

"""The printed form of an edit report: one table per kind of number (concepts, debias ratios, robustness), long
retain sets summed up, and a note when the numbers come from a model with random weights."""

from __future__ import annotations

# A list of preserved concepts longer than this (a retain set) is summed up: count, mean/max interference, the worst.
SUMMARY_ABOVE = 10
WORST_SHOWN = 5
DEMO_NOTE = ("Note: this pipeline's weights are random (a built-in demo pipeline): the numbers show that the edit "
             "ran, not what it does to a real model.")


def table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """A plain-text table: columns padded to their widest cell, floats with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]


def _name(text: str) -> str:
    return text or "<unconditional>"


def _preserved_rows(preserved: list[dict]) -> list[tuple]:
    if len(preserved) <= SUMMARY_ABOVE:
        return [("preserved", _name(r["concept"]), "", "interference", r["interference"]) for r in preserved]
    values = [r["interference"] for r in preserved]
    worst = sorted(preserved, key=lambda r: r["interference"], reverse=True)[:WORST_SHOWN]
    return ([("preserved", f"{len(preserved)} concepts", "", "mean interference", sum(values) / len(values)),
             ("preserved", f"{len(preserved)} concepts", "", "max interference", max(values))]
            + [("preserved", _name(r["concept"]), f"(worst {i})", "interference", r["interference"])
               for i, r in enumerate(worst, 1)])


def report_text(report) -> str:
    """The text of `str(report)` for an `EditReport`."""
    rows = [("erased", r["concept"], f"→ {_name(r['guide'])}", "efficacy", r["efficacy"]) for r in report.erased]
    rows += _preserved_rows(report.preserved)
    rows += [("held-out", _name(r["concept"]), "", "interference", r["interference"]) for r in report.held_out]
    rows += [("debiased", r["concept"], "", "shift", r["shift"]) for r in report.debiased]
    lines = table(("role", "concept", "guide", "metric", "value"), rows) if rows else []
    if report.ratios:
        ratio_rows = [(r["concept"], a, t, b, x, "yes" if r["reached"] else "NO")
                      for r in report.ratios for a, t, b, x in zip(r["attributes"], r["target"], r["before"],
                                                                    r["after"])]
        lines += ["", "debias ratios"] + table(("concept", "attribute", "target", "before", "after", "reached"),
                                               ratio_rows)
        missed = [r["concept"] for r in report.ratios if not r["reached"]]
        if missed:
            lines.append(f"not reached within the budget: {', '.join(dict.fromkeys(missed))}")
    if report.robustness:
        robust_rows = [(r["concept"], f"{r['reg']:g}", r["rounds"], " → ".join(f"{v:.2f}" for v in r["recovery"]),
                        r["recovery"][-1], r["norm_ratio"][-1]) for r in report.robustness]
        lines += ["", "robustness (adversarial recovery: 1 = an attacker's embedding brings the concept back, "
                      "0 = only the guide)"]
        lines += table(("concept", "ρ", "rounds", "recovery per round", "final", "‖c'‖/‖c‖"), robust_rows)
    s = report.summary()
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines.append(f"{report.layers} projections edited; mean efficacy {fmt(s['mean_efficacy'])}, "
                 f"mean interference preserved {fmt(s['mean_preserved_interference'])}, "
                 f"held-out {fmt(s['mean_held_out_interference'])}")
    if report.invariants or report.retain_dropped:
        lines.append(f"precise erasure: largest change of the {len(report.invariants)} invariant tokens "
                     f"{fmt(s['max_invariant_change'])}; retain set interference (preserved above) "
                     f"{fmt(s['mean_preserved_interference'])}; {len(report.retain_dropped)} retain prompt(s) "
                     f"dropped for naming an erased concept")
    if report.demo:
        lines.append(DEMO_NOTE)
    return "\n".join(lines)

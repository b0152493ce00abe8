"""A picture of an edit report: efficacy per erased concept, interference per preserved and held-out concept, and the
adversarial recovery per hardening round when the edit was hardened. Needs matplotlib (imported when called)."""

from __future__ import annotations

import os

# The report's panels: (title, what the bars mean), in the order they are drawn.
PANELS = {
    "erased": ("Efficacy per erased concept", "efficacy (1 = became its guide)"),
    "kept": ("Interference per kept concept", "relative change of keys/values (0 = untouched)"),
    "robustness": ("Adversarial recovery per hardening round", "recovery (1 = attacker gets it back)"),
}
MAX_BARS = 20  # more kept concepts than this (a retain set): the worst ones are drawn


def _matplotlib():
    try:
        import matplotlib

        if os.environ.get("MPLBACKEND") is None:
            matplotlib.use("Agg")  # draws to files: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting the report needs matplotlib: pip install matplotlib (or "
                          "pip install 'diffusers-uce[plot]')") from None
    return plt


def _label(text: str) -> str:
    text = text or "<unconditional>"
    return text if len(text) <= 28 else text[:27] + "…"


def plot_report(report, *, title: str | None = None, path: str | os.PathLike | None = None):
    r"""Draw an edit report as a matplotlib figure, one panel per kind of number.

    Panels: efficacy per erased concept; interference per preserved (and held-out) concept, the `MAX_BARS` largest
    when there are more; and, for a hardened edit, each erased concept's adversarial recovery before hardening and
    after every round.

    Args:
        report (`EditReport`): the report (`out.report`).
        title (`str`, *optional*): the figure's title; a demo pipeline's report says its weights are random.
        path (`str` or `os.PathLike`, *optional*): also save the figure there (PNG by its suffix).

    Returns:
        `matplotlib.figure.Figure`: the figure.

    Raises:
        `ImportError`: matplotlib is not installed (`pip install matplotlib`).

    Example:
    ```py
    >>> out = pipe.apply_concept_edits("Van Gogh; Picasso", guide="art", preserve="Monet")
    >>> out.report.plot().savefig("report.png")
    ```
    """
    plt = _matplotlib()
    kept = [(("preserved", r)) for r in report.preserved] + [("held-out", r) for r in report.held_out]
    if len(kept) > MAX_BARS:
        kept = sorted(kept, key=lambda kr: kr[1]["interference"], reverse=True)[:MAX_BARS]
    panels = [p for p, present in (("erased", report.erased), ("kept", kept), ("robustness", report.robustness))
              if present]
    if not panels:
        raise ValueError("the report is empty: nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        name, ylabel = PANELS[panel]
        ax.set_title(name, fontsize=11)
        ax.set_ylabel(ylabel, fontsize=9)
        if panel == "erased":
            values = [r["efficacy"] for r in report.erased]
            ax.bar(range(len(values)), values, color="#c0392b")
            ax.set_xticks(range(len(values)), [_label(r["concept"]) for r in report.erased], rotation=30, ha="right")
            ax.set_ylim(min(0.0, *values), 1.05)
        elif panel == "kept":
            colors = ["#2471a3" if role == "preserved" else "#7f8c8d" for role, _ in kept]
            ax.bar(range(len(kept)), [r["interference"] for _, r in kept], color=colors)
            ax.set_xticks(range(len(kept)), [_label(r["concept"]) for _, r in kept], rotation=30, ha="right")
            handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#2471a3", "#7f8c8d")]
            ax.legend(handles, ["preserved", "held-out"], fontsize=8)
        else:
            for r in report.robustness:
                ax.plot(range(len(r["recovery"])), r["recovery"], marker="o", label=_label(r["concept"]))
            ax.set_xlabel("hardening round (0 = before)", fontsize=9)
            ax.set_xticks(range(max(len(r["recovery"]) for r in report.robustness)))
            ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if report.demo:
        title = (title + " — " if title else "") + "demo pipeline: random weights, numbers mean nothing"
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig

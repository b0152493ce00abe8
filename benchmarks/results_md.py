"""Markdown for benchmarks/edit_speed.py: the tables and verdicts, and RESULTS.md kept as sections.

RESULTS.md is a title and intro followed by ``## `` sections. A run rewrites the sections of what it measured (the SD
1.5 comparison, one section per other family) and keeps every other section (notes added by hand included), written
atomically. A file from before the per-family sections (its SD 1.5 run in the intro and in top-level "Targets",
"Results", "Cost …" sections) is first folded into the SD 1.5 section.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from pathlib import Path

import torch

TARGETS = ("ratio baseline/package >= 10 at N = 50 (\"last\")", "N = 1000 (\"last\") under 60 s (CPU) / 1 s (GPU)",
           "package cost linear in the number of prompt tokens (least-squares fit R² >= 0.99)")
PREAMBLE = ["# Edit speed of diffusers_uce", "",
            "Written by `benchmarks/edit_speed.py`: a run rewrites the sections of the families it measured "
            "(`--families`, SD 1.5 only by default) and keeps every other section.", ""]
SD15_HEADING = "SD 1.5: diffusers_uce vs a straightforward per-layer UCE"
FAMILY_HEADING = "Solve time: {}-shaped pipeline"
LEGACY_SD15 = ("Targets", "Results", "Cost against the number of prompt tokens in the solve")


def machine(device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.device(device).type == "cuda" else ""
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores{gpu}; torch {torch.__version__}, python "
            f"{platform.python_version()}; device {device}; {datetime.date.today().isoformat()}")


def fit(rows, mode):
    """Least-squares ``t = a + b·tokens`` over the rows of `mode`: (a, b, R²), or None with fewer than 3 sizes."""
    pts = torch.tensor([(r["tokens"], r["total"]) for r in rows if r["mode"] == mode], dtype=torch.float64)
    if len(pts) < 3:
        return None
    x, y = pts.T
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    a = float(y.mean() - b * x.mean())
    return a, b, 1 - float(((y - a - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def linearity(rows) -> list[str]:
    """Seconds per 1k solve tokens per N, the marginal cost between successive N, and the linear fit, per mode."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode]
        per_k = ", ".join(f"N={r['n']}: {1000 * r['total'] / r['tokens']:.3f}" for r in sel)
        marginal = ", ".join(f"{1000 * (r2['total'] - r1['total']) / (r2['tokens'] - r1['tokens']):.3f}"
                             for r1, r2 in zip(sel, sel[1:]) if r2["tokens"] > r1["tokens"])
        f = fit(rows, mode)
        lines.append(f"- \"{mode}\": s per 1k solve tokens {per_k}; marginal s per 1k tokens between successive N: "
                     f"{marginal}" + (f"; fit t = {f[0]:.2f} s + {1000 * f[1]:.3f} s/1k tokens, R² = {f[2]:.4f}"
                                      if f else ""))
    return lines


def _errors(r) -> tuple[str, str]:
    return (f"{r['err']:.1e}", f"{r['derr']:.1e}") if r["err"] is not None else ("—", "—")


def table(rows) -> list[str]:
    lines = ["| mode | N | solve tokens | apply (s) | of which encoding (s) | fuse (s) | package total (s) | "
             "baseline (s) | baseline/package | max rel. weight diff | max rel. diff of ΔW | load |",
             "|---" * 12 + "|"]
    for r in rows:
        ran = r["baseline"] is not None
        base, ratio = (f"{r['baseline']:.2f}", f"{r['baseline'] / r['total']:.1f}×") if ran else ("not run", "—")
        lines.append(f"| {r['mode']} | {r['n']} | {r['tokens']} | {r['apply']:.2f} | {r['encode']:.2f} | "
                     f"{r['fuse']:.2f} | {r['total']:.2f} | {base} | {ratio} | {' | '.join(_errors(r))} | "
                     f"{r['load']:.1f} |")
    return lines


def _busy(r) -> str:
    cores = len(os.sched_getaffinity(0))
    return (f" (measured at load {r['load']:.1f} on {cores} cores: other processes shared the CPU, rerun on an idle "
            "machine)") if r["load"] > cores + 0.5 else ""


def verdicts(rows, device) -> list[str]:
    r50, r1000 = (next((r for r in rows if r["mode"] == "last" and r["n"] == n), None) for n in (50, 1000))
    limit = 1.0 if torch.device(device).type == "cuda" else 60.0
    out = [f"- {TARGETS[0]}: " + ("not measured" if r50 is None or r50["baseline"] is None else
                                  f"{r50['baseline'] / r50['total']:.1f}× — "
                                  + ("MET" if r50["baseline"] / r50["total"] >= 10 else "NOT MET") + _busy(r50)),
           f"- {TARGETS[1]}: " + ("not measured" if r1000 is None else f"{r1000['total']:.1f} s on {device} — "
                                  + ("MET" if r1000["total"] < limit else "NOT MET") + _busy(r1000))]
    fits = {m: fit(rows, m) for m in dict.fromkeys(r["mode"] for r in rows)}
    out.append(f"- {TARGETS[2]}: " + "; ".join(
        f"\"{m}\" " + ("fewer than 3 sizes" if f is None else f"R² = {f[2]:.4f} — " + ("MET" if f[2] >= 0.99 else
                                                                                   "NOT MET (R² < 0.99)"))
        + _busy(max((r for r in rows if r["mode"] == m), key=lambda r: r["load"])) for m, f in fits.items()))
    return out


def sd15_section(rows, header: list[str], device) -> list[str]:
    return [*header, "### Targets", "", *verdicts(rows, device), "", "### Results", "", *table(rows), "",
            "### Cost against the number of prompt tokens in the solve", "", *linearity(rows)]


def family_table(rows) -> list[str]:
    """Per-family rows: package time split into encoding, solve + report and fuse; the float64 check."""
    lines = ["| mode | N | solve tokens | encoding (s) | solve + report (s) | fuse (s) | solve + report + fuse (s) | "
             "package total (s) | float64 check (s) | layers checked | check/package | max rel. weight diff | "
             "max rel. diff of ΔW | load |", "|---" * 14 + "|"]
    for r in rows:
        ran = r["check"] is not None
        check = ((f"{r['check']:.2f}", r["checked"], f"{r['check'] / r['total']:.1f}×" if r["all_checked"] else "—")
                 if ran else ())
        lines.append(f"| {r['mode']} | {r['n']} | {r['tokens']} | {r['encode']:.2f} | {r['apply'] - r['encode']:.2f} "
                     f"| {r['fuse']:.2f} | {r['total'] - r['encode']:.2f} | {r['total']:.2f} | "
                     f"{' | '.join(check if ran else ('not run', '—', '—'))} | {' | '.join(_errors(r))} | "
                     f"{r['load']:.1f} |")
    return lines


# ---------------------------------------------------------------- RESULTS.md as sections
def split_sections(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines before the first ``## `` heading, and ``(heading, lines)`` per section (fenced code is skipped)."""
    preamble, sections, fence = [], [], False
    for line in text.splitlines():
        fence ^= line.startswith("```")
        if not fence and line.startswith("## "):
            sections.append((line[3:].strip(), []))
        else:
            (sections[-1][1] if sections else preamble).append(line)
    return preamble, sections


def _fold_legacy(preamble, sections):
    """Fold an old single-run file (SD 1.5 run in the intro and in top-level LEGACY_SD15 sections) into one section."""
    legacy = [i for i, (h, _) in enumerate(sections) if h in LEGACY_SD15]
    if not legacy or any(h == SD15_HEADING for h, _ in sections):
        return preamble, sections
    body = [line for line in preamble if not line.startswith("# ")]
    for i in legacy:
        body += [f"### {sections[i][0]}", *sections[i][1]]
    folded = [(SD15_HEADING, body) if i == legacy[0] else s for i, s in enumerate(sections)
              if i == legacy[0] or i not in legacy]
    return PREAMBLE, folded


def merge_section(text: str, heading: str, body: list[str], *, first: bool = False) -> str:
    """`text` with its ``## heading`` section replaced by `body` (added at the start if `first`, else at the end, when
    absent); every other section kept as it is."""
    preamble, sections = _fold_legacy(*split_sections(text))
    new = (heading, ["", *body, ""])
    at = next((i for i, (h, _) in enumerate(sections) if h == heading), None)
    if at is not None:
        sections[at] = new
    else:
        sections.insert(0 if first else len(sections), new)
    lines = list(preamble if any(line.strip() for line in preamble) else PREAMBLE)
    while lines and not lines[-1].strip():
        lines.pop()
    lines.append("")
    for h, part in sections:
        while part and not part[-1].strip():
            part = part[:-1]
        lines += [f"## {h}", *part, ""]
    return "\n".join(lines)


def write_section(path, heading: str, body: list[str], *, first: bool = False) -> None:
    """Replace (or add) one section of the markdown file at `path`, atomically (temporary file, then rename)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    merged = merge_section(text, heading, body, first=first)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(merged)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

"""Instant re-solves and start-up: what adding one concept to an applied edit costs, and `diffusers-uce --help`.

    python benchmarks/incremental_speed.py [--erase 100] [--output benchmarks/RESULTS.md]

On an SD 1.5-shaped pipeline (benchmarks/shapes.py: CLIP ViT-L/14 text tower, 32 cross-attention projections, random
weights): apply an edit erasing N artists (toward "art") while preserving N others, then add one more erased artist.
The pipeline caches the states of every prompt it encoded, so the second call encodes one prompt; the same second
call with the cache emptied first is what it cost before. Measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import diffusers_uce
from diffusers_uce.core.speed_options import retain_set
from diffusers_uce.loaders.encoding_cache import clear_encoding_cache

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_md  # noqa: E402
import shapes  # noqa: E402

HEADING = "Incremental re-solves and start-up"
TARGETS = ("adding one concept to an applied edit costs < 10 % of the first call", "`diffusers-uce --help` < 2 s")


def incremental(n: int, tiny: bool = False) -> dict:
    """Seconds of the first call, of adding one concept with the cache, and of the same without it."""
    pipe = diffusers_uce.attach(shapes.build_pipeline("sd15", "cpu", 0, tiny=tiny))
    artists = retain_set("artists")
    erase, preserve, extra = artists[:n], artists[n : 2 * n], artists[2 * n]
    times = {}
    for label, cached in (("without cache", False), ("with cache", True)):
        clear_encoding_cache(pipe)
        pipe.unload_concept_edits()
        t0 = time.perf_counter()
        pipe.apply_concept_edits(erase, guide="art", preserve=preserve)
        times.setdefault("first call", time.perf_counter() - t0)
        if not cached:
            clear_encoding_cache(pipe)
        t0 = time.perf_counter()
        pipe.apply_concept_edits(extra, guide="art")
        times[f"add one concept, {label}"] = time.perf_counter() - t0
    return times


def help_time(repeats: int = 3) -> float:
    """Best wall time of `diffusers-uce --help` in a new process."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffusers_uce.commands.uce_cli", "--help"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def section(n: int, times: dict, startup: float, command: str) -> list[str]:
    first, cached = times["first call"], times["add one concept, with cache"]
    uncached = times["add one concept, without cache"]
    lines = [f"Machine: {results_md.machine('cpu')}", "", f"Command: `{command}`", "",
             f"Pipeline: SD 1.5 shapes (`benchmarks/shapes.py`), random weights. Edit: erase the first {n} artists of "
             f"`retain_set(\"artists\")` toward \"art\", preserve the next {n}, default held-out set; then erase one "
             "more artist. Load: 1-minute load average at the end (other processes shared the 2 cores when above 2): "
             f"{os.getloadavg()[0]:.1f}.", "", "### Targets", "",
             f"- {TARGETS[0]}: {cached / first:.1%} — {'MET' if cached < 0.1 * first else 'NOT MET'}",
             f"- {TARGETS[1]}: {startup:.2f} s — {'MET' if startup < 2 else 'NOT MET'}", "", "### Results", "",
             "| call | seconds | of the first call |", "|---|---|---|"]
    lines += [f"| {label} | {value:.2f} | {value / first:.1%} |" for label, value in times.items()]
    lines += [f"| `diffusers-uce --help` (new process, best of 3) | {startup:.2f} | |", "",
              f"Without the cache, adding one concept re-encodes every prompt of every edit ({uncached:.2f} s here)."]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--erase", type=int, default=100, help="erased (and preserved) concepts of the first call")
    parser.add_argument("--tiny", action="store_true", help="tiny text tower (smoke test)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    times = incremental(args.erase, tiny=args.tiny)
    startup = help_time()
    lines = section(args.erase, times, startup, "python benchmarks/incremental_speed.py " + " ".join(argv or []))
    print("\n".join(lines))
    if not args.no_write:
        results_md.write_section(args.output, HEADING, lines)
    return times, startup


if __name__ == "__main__":
    main(sys.argv[1:])

"""The evaluation's metric names, checked without importing the metrics themselves (the command line starts fast)."""

from __future__ import annotations

METRICS = ("nudenet", "clip_score", "clip_accuracy", "lpips", "pixel_mae", "psnr")
PAIRED_METRICS = ("lpips", "pixel_mae", "psnr")  # one value per row: base vs edited


def check_metrics(metrics) -> tuple[str, ...]:
    """Validate metric names (an iterable or a comma-separated string); raises `ValueError` naming unknown ones."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))

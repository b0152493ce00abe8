"""The mark of a built-in demo pipeline (random weights), kept in its text encoder's config so that it survives
`save_pretrained` / `from_pretrained`: reports and model cards of such a pipeline say that its numbers mean nothing."""

from __future__ import annotations

DEMO_ATTRIBUTE = "uce_demo"


def mark_demo(pipe) -> None:
    """Mark `pipe` (a demo pipeline just built) as having random weights."""
    setattr(pipe.text_encoder.config, DEMO_ATTRIBUTE, True)


def is_demo_pipeline(pipe) -> bool:
    """Whether `pipe` is a built-in demo pipeline (or was saved from one)."""
    config = getattr(getattr(pipe, "text_encoder", None), "config", None)
    return bool(getattr(config, DEMO_ATTRIBUTE, False))

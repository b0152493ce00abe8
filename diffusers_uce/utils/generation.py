"""Seeded image generation for the parts that generate many images (the debias loop, the evaluation)."""

from __future__ import annotations

import contextlib
from logging import Filter, getLogger
from typing import Iterator, Sequence

import torch


class _NoPromptText(Filter):
    """Drops diffusers' "input was truncated ...: <the rest of the prompt>" warning: prompts are never logged."""

    def filter(self, record) -> bool:
        return "input was truncated" not in record.getMessage()


@contextlib.contextmanager
def quiet_pipeline(pipe) -> Iterator[None]:
    """Hide a pipeline's per-call progress bar (long runs show one bar of their own) and its warnings that quote
    prompts; both come back on exit, even on error."""
    old = pipe.__dict__.get("_progress_bar_config", {})
    loggers = {getLogger(c.__module__) for c in type(pipe).__mro__ if c.__module__.startswith("diffusers.")}
    no_prompts = _NoPromptText()
    pipe.set_progress_bar_config(**{**old, "disable": True})
    for log in loggers:
        log.addFilter(no_prompts)
    try:
        yield
    finally:
        pipe._progress_bar_config = old
        for log in loggers:
            log.removeFilter(no_prompts)


@torch.no_grad()
def generate_seeded(pipe, prompts: Sequence[str], seeds: Sequence[int], **call) -> list:
    """PIL images of `prompts`, image ``i`` from its own generator seeded with ``seeds[i]``: an image does not depend
    on which other prompts share its batch. `call` goes to the pipeline (steps, size, guidance)."""
    return pipe(prompt=list(prompts), generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pil", **call).images

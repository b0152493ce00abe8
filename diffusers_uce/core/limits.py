"""The largest counts an edit request, an edit file or an option may carry, checked before any work.

Each is far beyond what a useful edit needs (the authors' settings: 1–3 hardening rounds, 10 augmented copies, a few
hundred concepts, 1,734 retain artists, 10 debias iterations of 20 images), and small enough that a request or a
downloaded edit file within them runs in bounded time: a file that says `"rounds": 1000000000` is refused when it is
read instead of keeping `load_concept_edits` busy for days.
"""

from __future__ import annotations

MAX_HARDEN_ROUNDS = 100  # hardening rounds of one edit
MAX_AUGMENT = 100  # precise erasure: augmented copies per retain token
MAX_PROMPTS = 10_000  # entries of one list: erased concepts, guides, preserved (retain) prompts, hardening's preserved
# prompts, held-out concepts, invariant prompts or tokens, debiased concepts, attributes of one set
MAX_TOTAL_PROMPTS = 100_000  # erased and preserved prompts of every edit of a pipeline together
MAX_ATTRIBUTE_SETS = 100  # attribute sets of one debiased concept
MAX_EDITS = 1_000  # edit records of a pipeline or an edit file
MAX_DEBIAS_ITERATIONS = 100  # solves of the debias loop
MAX_DEBIAS_IMAGES = 10_000  # images per concept and measurement of the debias loop
MAX_INFERENCE_STEPS = 1_000  # denoising steps per image of the debias loop
MAX_IMAGE_SIZE = 16_384  # height and width of the debias loop's images, in pixels
MAX_BATCH_SIZE = 1_024  # images per pipeline call of the debias loop


def check_count(count: int, name: str, maximum: int) -> None:
    """Raise a `ValueError` naming `name` when `count` is above `maximum`."""
    if count > maximum:
        raise ValueError(f"{name} is {count}, more than the {maximum:,} diffusers-uce accepts (a bound that keeps "
                         "every edit, and every edit file loaded, within a bounded time): give at most "
                         f"{maximum:,}")

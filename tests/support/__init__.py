"""What the tests share: the repository's paths, float64 reference solves, pipeline helpers, a local Hub server."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"  # the paper's prompt sets, beside a checkout (absent in some clones)

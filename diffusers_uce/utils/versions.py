"""The package version, and the versions of the libraries an edit was made with."""

from __future__ import annotations

from importlib import metadata as importlib_metadata

# The one place the version is written: pyproject.toml reads it (setuptools dynamic metadata), and edit files, model
# cards, single-file checkpoints and the community pipelines record it.
__version__ = "0.1.0"


def library_versions() -> dict[str, str | None]:
    """Versions of diffusers-uce and the libraries an edit file depends on.

    diffusers-uce's own entry is `__version__`, the version of the code that runs (the installed metadata can lag
    behind a source checkout); the others come from the installed distributions, `None` when one is missing.
    """
    out = {"diffusers-uce": __version__}
    for name in ("diffusers", "torch", "transformers"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out

"""The package version, and the versions of the libraries an edit was made with."""

from __future__ import annotations

from importlib import metadata as importlib_metadata

__version__ = "0.1.0"


def library_versions() -> dict[str, str | None]:
    """Versions of diffusers-uce and the libraries an edit file depends on."""
    out = {}
    for name in ("diffusers-uce", "diffusers", "torch", "transformers"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out

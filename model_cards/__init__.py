"""Model card templates of diffusers-uce (Jinja2), shipped as the `diffusers_uce.model_cards` package.

The folder lives at the top of the repository and is mapped into the package by pyproject.toml (`package-dir`), so an
installed wheel holds the templates too; `diffusers_uce.hub.cards` finds them with `importlib.resources`.
"""

"""Sphinx configuration for Droplet's documentation.

Build with ``python3 -m nox -s docs`` (``sphinx-build -W``: any warning fails).
"""

from __future__ import annotations

import os
import sys

# Document the source tree even when the package is not installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))

import droplet  # noqa: E402

project = "Droplet"
author = "The Droplet developers"
copyright = "Droplet developers"  # noqa: A001
release = droplet.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {
    "description": "Low-latency serverless functions on Trio",
    "fixed_sidebar": True,
}

# autodoc: document in source order, type hints in the signatures.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}

# Google-style docstrings (STYLE.md 15). Attributes become :ivar: fields so a
# class whose Attributes section also has ``#:`` comments is not documented twice.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True


"""Sphinx configuration: ``sphinx-build -W docs docs/_build`` (``pip install -e '.[docs]'``)."""

project = "Flask-SharedState"
copyright = "2026, the Flask-SharedState developers"
extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]

"""Sphinx configuration: ``sphinx-build -W docs docs/_build`` (``pip install -e '.[docs]'``).

The look is the Pallets family's, as Flask's own ``docs/conf.py`` sets it up.
"""

from pallets_sphinx_themes import ProjectLink, get_version

# Project --------------------------------------------------------------

project = "Flask-SharedState"
copyright = "2026, the Flask-SharedState developers"
author = "The Flask-SharedState developers"
release, version = get_version("Flask-SharedState")

# General --------------------------------------------------------------

master_doc = "index"
extensions = ["sphinx.ext.autodoc", "pallets_sphinx_themes", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]

# HTML -----------------------------------------------------------------

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {
    "project_links": [
        ProjectLink("PyPI Releases", "https://pypi.org/project/Flask-SharedState/"),
        ProjectLink("Source Code", "https://github.com/flask-sharedstate/flask-sharedstate/"),
        ProjectLink(
            "Issue Tracker", "https://github.com/flask-sharedstate/flask-sharedstate/issues/"
        ),
    ]
}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
singlehtml_sidebars = {"index": ["project.html", "localtoc.html"]}
html_title = f"Flask-SharedState Documentation ({version})"
html_show_sourcelink = False

"""Sphinx configuration: the API reference is built from the docstrings of ``torch_mvn_ext``.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (``pip install -e ".[docs]"`` first).
"""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's package, not an installed copy

import torch_mvn_ext  # noqa: E402

project = "torch_mvn_ext"
author = "torch_mvn_ext contributors"
copyright = "torch_mvn_ext contributors"
release = version = torch_mvn_ext.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# No intersphinx: the build must work offline. References to torch and Pyro objects render as code, unlinked,
# and do not warn (nitpicky is off).
nitpicky = False

autodoc_member_order = "bysource"  # the source's order is the documentation's order
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

exclude_patterns = ["_build"]
templates_path = []
html_theme = "furo"
html_title = f"torch_mvn_ext {release}"
html_static_path = []

# examples.rst lists every script in examples/ from its module docstring (summary line, description, and the
# commands after "Run:"), so a new example appears without editing the page.
EXAMPLES_MARKER = ".. examples-list"


def _example_entry(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    summary, _, rest = doc.partition("\n")
    body, _, run = rest.partition("Run:")
    commands = [line.strip() for line in run.strip().splitlines() if line.strip()]
    title = f"``{path.name}``"
    lines = [title, "-" * len(title), "", summary.strip(), ""]
    if body.strip():
        lines += [".. code-block:: text", ""] + [f"   {line}".rstrip() for line in body.strip().splitlines()] + [""]
    lines += ["Run from the repository root:", "", ".. code-block:: bash", ""]
    lines += [f"   {c}" for c in commands or [f"python examples/{path.name}"]]
    lines += [f"   python examples/{path.name} --help", ""]
    return "\n".join(lines)


def _examples_list(app, docname, source):
    if docname == "examples":
        entries = [_example_entry(p) for p in sorted((ROOT / "examples").glob("*.py"))]
        source[0] = source[0].replace(EXAMPLES_MARKER, "\n\n".join(entries))


def setup(app):
    app.connect("source-read", _examples_list)

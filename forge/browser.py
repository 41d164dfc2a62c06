"""The feature browser's machinery, below viz.py: the static files its pages inline."""

import os

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def static_text(name):
    """A file of forge/static/, which ships beside this module (there is no package data to install)."""
    with open(os.path.join(STATIC, name), encoding="utf-8") as f:
        return f.read()


# every page's style; .scroll is right-to-left so that a graph wider than the window opens
# scrolled to its right end, where the last position and the logits are
CSS = static_text("style.css").rstrip("\n")
INDEX_JS = static_text("index.js")  # the index's script: sorting, filtering, loading index/ files

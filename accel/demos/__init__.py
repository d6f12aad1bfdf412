"""Runnable demonstrations, one sub-package each (`python -m accel.demos.patching`). The index of `accel.demos`.

The code lives in the repository's top-level `demos/` folder, which has no `__init__.py` of its own (see
`pyproject.toml`): so it never shadows an installed top-level package of the same name when Python runs from
the repository root.
"""

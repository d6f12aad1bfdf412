"""Quality-vs-speed evaluation harness (`accel-eval`, `python -m accel.eval`). The index of `accel.eval`.

The code lives in the repository's top-level `eval/` folder, which has no `__init__.py` of its own (see
`pyproject.toml`): so it never shadows an installed top-level package of the same name when Python runs from
the repository root.
"""

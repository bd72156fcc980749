"""petalflow: the one import name the installed distribution claims.

``petalflow.flows`` and ``petalflow.tasks`` are the repository's top-level ``flows/`` and
``tasks/`` folders (mapped in pyproject.toml), so an environment that installs petalflow gains no
top-level ``flows`` or ``tasks`` module that could clash with the published distributions of
those names. Nothing happens at import time.
"""

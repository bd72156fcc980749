"""petalflow pipeline stages: plain functions, each wrapped by a thin Prefect task.

Import nothing heavy here: TensorFlow and MLflow are imported inside the functions that need them,
so that ``import petalflow.tasks`` (and the CLI's option parsing) stays fast and side-effect free.
"""

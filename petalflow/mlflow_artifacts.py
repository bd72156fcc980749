"""MLflow's ``mlflow-artifacts:`` scheme for petalflow's processes, as an MLflow artifact
repository plugin (entry point ``mlflow.artifact_repository``, pyproject.toml).

A tracking server started with ``--artifacts-destination`` (the stack's: ``mlflow/artifacts``
beside ``mlflow/mlflow.db``) gives the experiments it creates artifact locations such as
``mlflow-artifacts:/1``, which MLflow's own repository reaches only through a server. The
same ``mlflow/`` store is also petalflow's embedded one (``petalflow train``, ``predict`` and
``pull`` without ``MLFLOW_TRACKING_URI``), where those URIs failed ("the tracking URI must be a
valid http or https URI"): a model trained from the Prefect UI could not be used, nor its
experiment trained into, once the stack was down or its environment not sourced.

With a SQLite tracking URI, ``mlflow-artifacts:/PATH`` is read and written at
``<the database's folder>/artifacts/PATH``: where that store's server keeps it, so the server
serves what was written here and the other way round. With any other tracking URI (a server)
MLflow's own repository is used, unchanged. Only where petalflow is installed; nothing is
imported until MLflow asks for a repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse


def sqlite_database(tracking_uri: Optional[str]) -> Optional[Path]:
    """The database file a SQLite tracking URI ``sqlite:///<path>[?<query>]`` names, as
    given (relative to the current folder when relative), else None."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].partition("?")[0]
    return Path(path) if path else None


def store_artifacts_dir(tracking_uri: Optional[str]) -> Optional[Path]:
    """``<folder>/artifacts`` (resolved) for a SQLite tracking URI ``sqlite:///<folder>/<db>``,
    else None: where petalflow keeps that store's artifacts (``registry.artifact_location``)
    and its server is given as ``--artifacts-destination`` (``mlflow/artifacts`` in the
    stack)."""
    db = sqlite_database(tracking_uri)
    return (db.parent / "artifacts").resolve() if db else None


def local_artifacts_root(tracking_uri: Optional[str]) -> Optional[Path]:
    """``store_artifacts_dir`` when that store's database and artifacts folder exist, else
    None."""
    db, root = sqlite_database(tracking_uri), store_artifacts_dir(tracking_uri)
    return root if db and db.is_file() and root.is_dir() else None


def served_artifacts_repository(artifact_uri: str, tracking_uri: Optional[str] = None,
                                registry_uri: Optional[str] = None):
    """The repository for an ``mlflow-artifacts:`` URI: the store's own artifacts folder with
    a SQLite tracking URI (``local_artifacts_root``), MLflow's ``MlflowArtifactsRepository``
    otherwise (which also says what is wrong with a path outside that folder)."""
    import mlflow
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    root = local_artifacts_root(tracking_uri or mlflow.get_tracking_uri())
    path = (root / unquote(urlparse(artifact_uri).path).lstrip("/")).resolve() if root else None
    if path is None or not path.is_relative_to(root):
        return MlflowArtifactsRepository(artifact_uri, tracking_uri=tracking_uri,
                                         registry_uri=registry_uri)
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    return LocalArtifactRepository(path.as_uri(), tracking_uri=tracking_uri,
                                   registry_uri=registry_uri)

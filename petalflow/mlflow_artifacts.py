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


_RELOCATED: set = set()  # database files relocate_artifacts has looked at in this process


def _local_location(location: Optional[str]) -> Optional[Path]:
    """The folder a ``file:`` URI or an absolute path names, else None (``mlflow-artifacts:``,
    a cloud store's URI)."""
    if not location:
        return None
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    return Path(location) if location.startswith("/") else None


def _same_file(a: Path, b: Path) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def relocate_artifacts(tracking_uri: Optional[str]) -> list[tuple[str, str]]:
    """Once per process and store: for a SQLite store whose folder was moved or copied (the
    project folder renamed, moved out of Downloads, copied to another machine), the records
    that still name its artifacts where they were are rewritten to name them where they are,
    ``<the database's folder>/artifacts``; the (old, new) locations rewritten, [] for none.

    MLflow records absolute ``file:`` locations (an experiment's, each run's, each logged
    model's and model version's): moved, every registered model failed to load ("No such
    artifact: ''") and new runs wrote into the old place (a copy: into the original's folder,
    recreated if gone). An experiment's location is taken as the store's own when it is a
    folder named ``artifacts`` other than this one and the experiment has no runs or one of its
    runs' folders is here, unless that folder's database is this one seen at another path (a
    bind mount); any other location (a folder of the user's choosing, a server's
    ``mlflow-artifacts:``) is left as it is. One transaction: all or nothing."""
    import sqlite3

    db = sqlite_database(tracking_uri)
    if db is None or db.name == ":memory:" or not db.is_file():
        return []
    db = db.resolve()
    root = db.parent / "artifacts"
    if db in _RELOCATED or not root.is_dir():
        return []
    _RELOCATED.add(db)
    new = root.as_uri()
    moved: list[tuple[str, str]] = []
    con = sqlite3.connect(str(db), timeout=60)
    try:
        with con:
            for exp_id, location in con.execute(
                    "SELECT experiment_id, artifact_location FROM experiments").fetchall():
                old = _local_location(location)
                if old is None or old.name != "artifacts" or old == root \
                        or (old.exists() and old.resolve() == root) \
                        or _same_file(old.parent / db.name, db):
                    continue  # not the store's folder, or this store seen at another path
                runs = [r for (r,) in con.execute(
                    "SELECT run_uuid FROM runs WHERE experiment_id = ?", (exp_id,))]
                if runs and not any((root / run).is_dir() for run in runs):
                    continue
                prefix = location.rstrip("/")
                head = len(prefix) + 1  # the prefix and the "/" after it
                con.execute("UPDATE experiments SET artifact_location = ? "
                            "WHERE experiment_id = ?", (new, exp_id))
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                            "WHERE substr(artifact_uri, 1, ?) = ?", (new, head, head, prefix + "/"))
                con.execute("UPDATE logged_models SET artifact_location = ? || "
                            "substr(artifact_location, ?) WHERE substr(artifact_location, 1, ?) "
                            "= ?", (new, head, head, prefix + "/"))
                for column in ("storage_location", "source"):
                    con.execute(f"UPDATE model_versions SET {column} = ? || substr({column}, ?) "
                                f"WHERE substr({column}, 1, ?) = ?",
                                (new, head, head, prefix + "/"))
                moved.append((prefix, new))
    except sqlite3.Error:  # a store MLflow has not made (no such table) or cannot open now
        return []
    finally:
        con.close()
    return moved


def relocation_said(store: Path, old: str, new: str) -> str:
    """What a command says for each location ``relocate_artifacts`` rewrote."""
    return (f"the MLflow store {store} was moved or copied: its records named its artifacts "
            f"at {old}; they now name them where they are, {new}")

"""Small helpers every stage shares: an advisory file lock, file hashing, atomic writes and
human-readable sizes. Stage modules import these; this module imports no stage."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

CHUNK = 1 << 20

# Environment defaults of a petalflow process, applied once by its entry point (the CLI, and the
# ``env`` job variables in deployment.yaml for runs a worker starts; a test checks they agree):
# TensorFlow's native INFO/WARNING lines off; ``tf.keras`` resolves to tf-keras, the Keras that
# TF Hub's ``KerasLayer`` and petalflow use, so Keras 3 is never imported as well (0.7 s, memory).
ENV_DEFAULTS = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_USE_LEGACY_KERAS": "1",
}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, which container limits set), not the
    machine's count: the thread count for TFLite interpreters."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API on this platform
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """git commit of the petalflow checkout (+"-dirty" with local changes), else the version.

    Once per process: the code a process runs is what it loaded, and each call forks this
    process twice for git. ``petalflow train`` asks at its start, while the process is small:
    a fork of the running flow's ~1 GB process was counted twice by the benchmark's process-tree
    RSS when it was sampled before the child's exec."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "petalflow-" + version("petalflow")
        except PackageNotFoundError:
            return "unknown"


def petalflow_home() -> Path:
    """Where downloads, extracted datasets and run working folders live (``PETALFLOW_HOME``)."""
    return Path(os.environ.get("PETALFLOW_HOME", ".petalflow")).resolve()


LOCAL_STORE_DIR = "mlflow"  # the embedded MLflow store: <folder>/mlflow.db, <folder>/artifacts


def local_store_db() -> Path:
    """The embedded MLflow store's database file in the current folder."""
    return Path(LOCAL_STORE_DIR).resolve() / "mlflow.db"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_store(model_uri: Optional[str] = None) -> None:
    """For the commands that only read models (predict, pull, models): with MLFLOW_TRACKING_URI
    unset, the embedded store must exist in this folder. Opening it would create an empty one,
    and the command would then say that no such model is registered, when the model is in the
    store of the folder ``petalflow train`` ran in. Raises StoreNotFound, creating nothing. A
    ``model_uri`` that is not models:/ or runs:/ (a pulled model's folder) needs no store. A
    tracking server must answer (``require_tracking_server``)."""
    from petalflow.tasks.errors import StoreNotFound

    if model_uri is not None and not model_uri.startswith(("models:", "runs:")):
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from petalflow.mlflow_artifacts import sqlite_database

        db = sqlite_database(uri)
        if db is not None and db.name != ":memory:" and not db.is_file():
            # Opened, it would be created empty here (the README's relative
            # sqlite:///mlflow/mlflow.db exported, then the command run in another folder).
            relative = "" if db.is_absolute() else \
                f"; its relative path starts from {os.getcwd()}"
            raise StoreNotFound(
                f"no MLflow store at {db.resolve()} (MLFLOW_TRACKING_URI={uri}{relative}), and "
                "none was created there; an absolute URI names the store from any folder: "
                "sqlite:////path/to/mlflow/mlflow.db")
        require_tracking_server()
        return
    store = local_store_db()
    if not store.is_file():
        raise StoreNotFound(f"no MLflow store here: {store} does not exist and "
                            "MLFLOW_TRACKING_URI is not set")


_ANSWERED: set = set()  # tracking server URIs that answered ask_tracking_server, TLS checked


def ask_tracking_server(uri: str) -> Optional[BaseException]:
    """One request to an http(s) tracking server (``/health``), at once and without retries,
    as MLflow's client makes it (requests, the same proxies, its TLS settings:
    MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_CLIENT_CERT_PATH, REQUESTS_CA_BUNDLE):
    None when it answered (any status; once per URI and process, then remembered), else the
    error requests raised. ``require_tracking_server`` and the certificate check before
    MLflow's first call (``registry.check_server_certificate``) read it."""
    import requests

    if uri in _ANSWERED:
        return None
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10,
                     verify=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True,
                     cert=os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None)
    except requests.RequestException as exc:
        return exc
    _ANSWERED.add(uri)
    return None


def tracking_uri_problem(uri: str) -> Optional[str]:
    """What is wrong with a tracking URI that MLflow would read as another thing, naming the
    address meant; None for any other: the MLflow UI's page address copied from a browser
    (``http://host:5000/#/models``: MLflow's calls went to ``/#/models/api/2.0/…``, the
    server answered its web page, and the error quoted that page's HTML) or a server's
    ``host:port`` without ``http://`` (MLflow read it as a file store's folder and said that
    store is in maintenance mode)."""
    from urllib.parse import urlsplit

    said = f"MLFLOW_TRACKING_URI={redact_url(uri)}"
    if uri.lower().startswith(("http://", "https://")) and "#" in uri:
        server = urlsplit(uri)._replace(fragment="").geturl()
        return (f"{said} is the address of a page of the MLflow UI (the part from '#' names "
                f"the page): give the server's own address, {redact_url(server)}")
    if re.fullmatch(r"[A-Za-z0-9.-]+:[0-9]{1,5}(/.*)?", uri):
        return (f"{said} has no scheme, so MLflow would read it as a folder of files: the "
                f"server's address is http://{uri}")
    return None


def require_tracking_server() -> None:
    """For a command a person runs with MLFLOW_TRACKING_URI an http(s) server: raises
    TrackingServerUnreachable when nothing answers there (``ask_tracking_server``: the
    connection refused, no such host, no answer in 10 s). MLflow's client retries such a call
    7 times: `petalflow models` said so after 8 minutes. Any answer, or a TLS failure (which
    ``registry.check_server_certificate`` names), lets the command go on. Deployed runs keep
    MLflow's retries: there, a server restarting is waited for."""
    from petalflow.tasks.errors import TrackingServerUnreachable

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if problem := tracking_uri_problem(uri):
        raise TrackingServerUnreachable(problem)
    if not uri.lower().startswith(("http://", "https://")):
        return
    import requests

    exc = ask_tracking_server(uri)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)) and not isinstance(
            exc, requests.exceptions.SSLError):
        raise TrackingServerUnreachable(
            f"the MLflow tracking server at {redact_url(uri)} (MLFLOW_TRACKING_URI) could not "
            f"be reached: {_innermost(exc)}")


def error_chain(exc: Optional[BaseException]) -> Iterator[BaseException]:
    """``exc`` and the errors it wraps, outermost first: the ``reason`` urllib's URLError and
    urllib3's MaxRetryError hold, else what it was raised from or while handling."""
    seen: set[int] = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else (exc.__cause__
                                                                 or exc.__context__)


def _innermost(exc: BaseException) -> str:
    """What a wrapped connection error says at its root ("ConnectionRefusedError: [Errno 111]
    Connection refused"), not urllib3's pool and retry text around it."""
    *_, root = error_chain(exc)
    return f"{type(root).__name__}: {root}"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: "1 image", "0 images", "3 files"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def short_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_bytes(n: int) -> str:
    """``21474836480`` -> ``21474836480 bytes (20.0 GiB)``: exact, and readable."""
    return f"{n} bytes" if abs(n) < 1024 else f"{n} bytes ({short_size(n)})"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Download, extraction and provenance all hash the same archive; the digest is remembered per
    (device, inode, size, mtime), which a rename into place keeps and any rewrite changes.
    """
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Exclusive advisory lock on ``path`` (created if missing) for the ``with`` block, so two
    runs never write the same download, dataset or training folder; a killed process releases
    it. ``wait=False`` does not block: it yields False at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def holder_lock(path: Path, holder: str, on_wait: Callable[[str], None],
                on_left: Optional[Callable[[str], None]] = None) -> Iterator[float]:
    """``file_lock`` that says who holds it: while a process holds it, the file holds its
    ``holder`` text; a process that finds it held calls ``on_wait`` with that text, then waits
    for it. Yields the seconds it waited (0.0 when the lock was free). A killed holder's lock is
    released by the system, its text is not (a holder that ends empties it): the next holder
    calls ``on_left`` with it, then writes its own."""
    with contextlib.ExitStack() as held:
        waited = 0.0
        if not held.enter_context(file_lock(path, wait=False)):
            began = time.perf_counter()
            on_wait(path.read_text().strip() or "a process that has not said which yet")
            held.enter_context(file_lock(path))
            waited = time.perf_counter() - began
        left = path.read_text().strip()
        if left and on_left is not None:
            on_left(left)
        path.write_text(holder)
        try:
            yield waited
        finally:
            path.write_text("")


REMOVING = ".removing-"  # the prefix of a folder ``set_aside`` for deletion


def tree_bytes(root: Path) -> int:
    """The bytes of the files under ``root``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def set_aside(folder: Path) -> int:
    """Rename ``folder`` to ``.removing-<name>`` beside it, in one step (no reader finds it half
    deleted, no later run takes it), and return its size; ``remove_set_aside`` deletes it."""
    size = tree_bytes(folder)
    os.replace(folder, folder.with_name(REMOVING + folder.name))
    return size


def remove_set_aside(root: Path) -> None:
    """Delete the folders ``set_aside`` under ``root``, those a killed process left too."""
    for folder in Path(root).glob(REMOVING + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed into place: readers see the old file or
    the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half file left behind
        tmp.unlink(missing_ok=True)
        raise


def printable_name(path) -> str:
    """A file name or path as text any CSV, JSON or MLflow tag can hold: bytes that are not
    UTF-8 (a name from a Latin-1 system, b"ph\\xe9to.jpg", read as surrogates) escaped
    ("ph\\xe9to.jpg"); a UTF-8 name unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# Query parameters whose values are secrets in the URLs people pass: presigned S3/GCS URLs
# (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature), Azure SAS
# (sig), tokens and API keys.
SECRET_QUERY_KEY = re.compile(r"sig|token|secret|key|credential|passw|pwd|auth|session",
                              re.IGNORECASE)


def redact_url(url: Optional[str]) -> Optional[str]:
    """``url`` as petalflow records it where others read it (MLflow's run and version tags and
    parameters, the model card, the flow's log): a user name and password in it as "***", and
    the values of query parameters that hold secrets. The download uses the URL as given.
    Anything but an http(s) URL (a path, None) is returned as it is."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]

    def hidden(item: str) -> str:
        key, equals, _value = item.partition("=")
        return f"{key}=***" if equals and SECRET_QUERY_KEY.search(key) else item

    query = "&".join(hidden(item) for item in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls_in(text: str) -> str:
    """``text`` with every http(s) URL in it as ``redact_url`` records it (an error message
    recorded where others read it)."""
    return re.sub(r"https?://[^\s'\"<>)]+", lambda m: redact_url(m.group(0)), text,
                  flags=re.IGNORECASE)


def redacted_source(source: Optional[dict]) -> Optional[dict]:
    """A source description (``download.describe_source``) as a run's summary shows it (the
    command prints it, ``--summary-json`` writes it, Prefect keeps it as the run's result): its
    URL as ``redact_url`` records it (where a redirect led is recorded so already)."""
    return {**source, "url": redact_url(source.get("url"))} if source else source


# Query parameters a presigned URL gets anew each time it is signed: when, and for how long
# (AWS and Google Cloud Storage Signature V4 and V2; an Azure SAS's start and expiry), and the
# parameters whose presence says a URL is presigned.
SIGNING_TIME_KEYS = frozenset({"x-amz-date", "x-amz-expires", "x-goog-date", "x-goog-expires",
                               "expires", "st", "se"})
SIGNATURE_KEYS = frozenset({"x-amz-signature", "x-goog-signature", "signature", "sig"})


def source_url(url: Optional[str]) -> Optional[str]:
    """What names a dataset source (its download folder, its extraction record, the watch's
    events and state, the champion's source compared): ``redact_url``'s form, and for a
    presigned URL without the parameters each signing sets anew (``SIGNING_TIME_KEYS``), so
    the same object signed again is the same source, revalidated rather than downloaded
    again. Anything but an http(s) URL is returned as it is."""
    from urllib.parse import urlsplit, urlunsplit

    redacted = redact_url(url)
    if not redacted or urlsplit(redacted).scheme.lower() not in ("http", "https"):
        return redacted
    parts = urlsplit(redacted)
    items = parts.query.split("&") if parts.query else []
    names = [item.partition("=")[0].lower() for item in items]
    if not SIGNATURE_KEYS.intersection(names):
        return redacted
    kept = [item for item, name in zip(items, names) if name not in SIGNING_TIME_KEYS]
    return urlunsplit(parts._replace(query="&".join(kept)))


def netrc_file() -> Optional[Path]:
    """This machine's netrc file (``$NETRC``, else ``~/.netrc``) when there is one: the
    credentials curl, wget, pip and git read, per host, kept out of the dataset URL (and so out
    of a run's parameters, which Prefect's UI shows)."""
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    return path if path.is_file() else None


def url_authorization(url: str) -> tuple[str, Optional[str]]:
    """(``url`` without a user and password, the ``Authorization`` header for it): basic
    authentication with the URL's own credentials, else with the netrc file's entry for its
    host, else None. For clients that do not read either (urllib: TF Hub's downloads). A netrc
    file that does not parse is a ValueError naming it."""
    import base64
    import netrc
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return url, None
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    if parts.username is not None:
        login, password = unquote(parts.username), unquote(parts.password or "")
    else:
        path = netrc_file()
        try:
            found = netrc.netrc(str(path)).authenticators(parts.hostname) if path else None
        except (netrc.NetrcParseError, OSError) as exc:
            raise ValueError(f"cannot read the netrc file {path} (credentials for downloads): "
                             f"{exc}") from None
        if not found:
            return bare, None
        login, password = found[0], found[2]
    token = base64.b64encode(f"{login}:{password}".encode()).decode()
    return bare, f"Basic {token}"


def credentials_advice(url: str, status: int, what: str) -> str:
    """What to do about a 401 or 403 answer to ``url`` (``what`` it is: "the archive"), by
    what credentials the request carried; "" for other answers and presigned URLs (their
    signature is their credential)."""
    import netrc
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    names = {item.partition("=")[0].lower() for item in parts.query.split("&")}
    if status not in (401, 403) or SIGNATURE_KEYS.intersection(names):
        return ""
    host = parts.hostname
    if parts.username:
        return "; the server refused the credentials in the URL"
    path = netrc_file()
    if path is not None:
        with contextlib.suppress(netrc.NetrcParseError, OSError):
            if netrc.netrc(str(path)).authenticators(host):
                return f"; the server refused the credentials for {host} in {path}"
    return (f"; if {what} needs credentials, give them for {host} in the netrc file of "
            f"the machine that downloads (~/.netrc, or the file $NETRC names: `machine {host} "
            "login USER password TOKEN`), which keeps them out of the URL and the run's "
            "parameters")


def tls_problem(exc: Optional[BaseException], url: str,
                setting: str = "SSL_CERT_FILE") -> Optional[str]:
    """The message for a TLS failure no retry changes at ``url``'s host, when ``exc`` or an
    error it wraps (httpx's or requests' chain, urllib's ``reason``) is one (``tls_failure``):
    a certificate this client did not trust (a server with an organisation's own certificate
    authority, a self-signed, expired or other host's certificate), naming the environment
    ``setting`` that trusts an authority; or a server that does not answer in TLS at all (an
    https:// URL of a plain-HTTP server), giving the http:// URL. None otherwise: the caller
    raises it as a permanent error."""
    import ssl
    from urllib.parse import urlsplit

    error = tls_failure(exc)
    if error is None:
        return None
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    if not isinstance(error, ssl.SSLCertVerificationError):
        plain = redact_url(parts._replace(scheme="http").geturl())
        return (f"the server at {host} did not answer in TLS ({error.reason}: an https:// "
                f"URL of a server that speaks plain HTTP, or a port that is not the web "
                f"server's): a plain-HTTP server's URL begins http://, {plain}")
    reason = error.verify_message or error.reason or str(error)
    return (f"the certificate of {host} is not trusted ({reason}): it is checked against the "
            "certificate authorities Python trusts; for a server with your organisation's own "
            f"authority, set {setting} to the authority's certificate (a PEM file) where "
            "petalflow runs (a deployment: the worker's environment); an expired certificate, "
            "or one for another name, is fixed on the server")


# What OpenSSL says when a server's first bytes are no TLS record: it answered in plain HTTP
# (an https:// URL of an http-only server) or speaks another protocol on that port. Retried,
# each took the retries' time (38 s for a dataset) and ended "offline, or behind a proxy?".
NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                     "UNKNOWN_PROTOCOL", "HTTP_REQUEST"})


def tls_failure(exc: Optional[BaseException]):
    """The ``ssl`` error in ``exc``'s chain (``error_chain``) that no retry changes: an
    ``ssl.SSLCertVerificationError``, or an ``ssl.SSLError`` saying the server does not speak
    TLS (``NOT_TLS``); None otherwise."""
    import ssl

    return next((e for e in error_chain(exc) if isinstance(e, ssl.SSLCertVerificationError)
                 or (isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in NOT_TLS)),
                None)


# A web address written without its scheme ("example.com/photos.tgz", "localhost:8000/x"),
# which would be read as a local path: a host name with a top-level domain, localhost or an
# IPv4 address, an optional port, then a path ("photos.tgz" alone is a file's name).
_SCHEMELESS_URL = re.compile(
    r"^(?P<host>localhost|\d{1,3}(?:\.\d{1,3}){3}|(?:[a-z0-9-]+\.)+[a-z]{2,})(?::\d{1,5})?/",
    re.IGNORECASE)


def scheme_hint(value: str) -> str:
    """For a path that does not exist and reads as a web address without http(s)://, the
    clause saying which URL it may mean ("; a web address needs its scheme: https://…"; http
    for localhost and an IP address); "" otherwise."""
    found = _SCHEMELESS_URL.match(value)
    if not found:
        return ""
    host = found.group("host").lower()
    scheme = "http" if host == "localhost" or host[0].isdigit() else "https"
    return f"; a web address needs its scheme: {scheme}://{value}"


def utc_minute(epoch: float) -> str:
    """``epoch`` (seconds) as a time to the minute, in UTC: "2026-12-05 16:08 UTC"."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


def span_words(seconds: float) -> str:
    """A duration as people say it: "7 days", "5 hours", "90 minutes"."""
    units = (("day", 86400), ("hour", 3600), ("minute", 60))
    unit, size = next((unit, size) for unit, size in units
                      if seconds >= 2 * size or unit == "minute")
    n = max(1, round(seconds / size))
    return counted(n, unit)


# The longest Retry-After a run waits for (a rate limit's minute, a restart): a longer one ends
# the run at once, saying when to try again (a schedule or watch-data tries at its next turn).
RETRY_AFTER_MAX_S = 300.0


def retry_after_s(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """The seconds a Retry-After header asks to wait (delta-seconds or an HTTP date, RFC 9110);
    None when there is none or it does not parse."""
    from datetime import timezone
    from email.utils import parsedate_to_datetime

    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def wait_words(seconds: float) -> str:
    """A wait or limit as a message gives it: "45 s" under two minutes, else ``span_words``
    to the minute ("10 minutes", "3 hours")."""
    return f"{seconds:.0f} s" if seconds < 120 else span_words(round(seconds / 60) * 60)


def refused_for_now(code: int, retry_after: Optional[str], what: str,
                    said: str = "") -> Exception:
    """The error for a server's answer worth retrying (408, 429, 5xx: ``is_transient_status``)
    to a request ``what`` names ("from URL"). Where it asks to wait (Retry-After) up to
    RETRY_AFTER_MAX_S, that wait is made here, before the TransientError the task retries, so
    the retry comes when the server said; a longer one is ServerBusy at once (not retried),
    saying when to try again. ``said``: the server's own words for it."""
    from http import HTTPStatus

    from petalflow.tasks import errors

    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "server error" if code >= 500 else "refused"
    text = f"HTTP {code} ({phrase}) {what}" + (f": {said}" if said else "")
    wait = retry_after_s(retry_after)
    if wait is None:
        return errors.TransientError(text)
    if wait > RETRY_AFTER_MAX_S:
        return errors.ServerBusy(
            f"{text}; the server asks to be asked again in {wait_words(wait)} (Retry-After), "
            f"after {utc_minute(time.time() + wait)}, longer than a run waits "
            f"({wait_words(RETRY_AFTER_MAX_S)}): try again after then (a schedule or "
            "watch-data tries again at its next turn)")
    log("%s; the server asks to be asked again in %s (Retry-After): waiting", text,
        wait_words(wait), level=30)
    time.sleep(wait)
    return errors.TransientError(
        f"{text}; waited the {wait_words(wait)} it asked for (Retry-After)")


def special_file(path) -> Optional[str]:
    """What ``path`` is when it exists and is neither a file nor a folder (links followed):
    "a pipe (what a shell's <(command) or `| ... /dev/stdin` gives)", "a socket", "a
    device"; None otherwise. Such a thing can be read once at most: the runs read an archive
    or an image more than once, and a schedule reads a dataset again where it was recorded."""
    import stat

    try:
        mode = os.stat(Path(path).expanduser()).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode):
        return "a pipe (what a shell's <(command) or `| ... /dev/stdin` gives)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def where_relative(paths: list[str]) -> str:
    """" (relative paths start from <the working folder>)" when one of ``paths`` is relative
    (said where a path is not found: a deployment's run starts from its worker's working
    folder, which whoever typed the path in the UI does not see); else ""."""
    if all(Path(p).expanduser().is_absolute() for p in paths):
        return ""
    return f" (relative paths start from {os.getcwd()})"


def not_a_saved_model(folder: Path) -> str:
    """Why ``folder``, given as a SavedModel, is none, and where the SavedModel is when it is
    near: the folder that holds ``folder`` (its ``variables/`` given), or those a level or two
    inside it (a folder of backbones, a TF Hub download extracted into ``NAME/1/``)."""
    folder = Path(folder)
    for parent in list(folder.parents)[:2]:
        if (parent / "saved_model.pb").is_file():
            return f"no saved_model.pb in it; it is inside the SavedModel folder {parent}: give that"
    import itertools

    found = sorted(str(pb.parent) for pb in itertools.islice(itertools.chain(
        folder.glob("*/saved_model.pb"), folder.glob("*/*/saved_model.pb")), 50))
    if not found:
        return "no saved_model.pb in it, nor in its subfolders"
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return (f"no saved_model.pb in it; the SavedModel folder{'s' if len(found) > 1 else ''} "
            f"inside it: {shown}: give {'one of them' if len(found) > 1 else 'that'}")


def redacted(url: str) -> bool:
    """True for a URL as ``redact_url`` records it, its credentials replaced by "***" (a user
    and password, a secret query value): a record, which cannot download."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and (
        parts.netloc.startswith("***@")
        or any(item.partition("=")[2] == "***" for item in parts.query.split("&")))


# Folders archivers, NAS systems and operating systems add beside and inside the data (by
# their names, compared case-blind): never a class, their files never photos of one, and not
# searched for images to classify.
SYSTEM_FOLDERS = {
    "__macosx": "macOS Finder's resource forks",
    "@eadir": "a Synology NAS's thumbnails and metadata",
    "#recycle": "a NAS's recycle bin",
    "#snapshot": "a NAS's snapshots",
    "$recycle.bin": "Windows' recycle bin",
    "system volume information": "Windows' system folder",
    "lost+found": "what a file-system check recovered",
}


def system_folder(name: str) -> Optional[str]:
    """What a folder named ``name`` is when an archiver or a system made it (None otherwise)."""
    return SYSTEM_FOLDERS.get(name.casefold())


def unread_folder(parts: Sequence[str]) -> bool:
    """Whether the folder of these relative path ``parts`` is one whose files are never data:
    hidden, or inside a hidden or system folder (``system_folder``). The scan quarantines such
    files; a folder's listing and `petalflow predict`'s search leave them out."""
    return any(part.startswith(".") or system_folder(part) for part in parts)


# An input item "@photos.txt" names a text file of inputs (files, folders, patterns), one per
# line: a user's own list, and how `petalflow predict` hands the flow a shell glob's thousands
# of files (a flow run's parameters hold at most 512 KiB in Prefect's API).
LIST_PREFIX = "@"


def input_list(item: str) -> Optional[Path]:
    """The list file an input item names ("@photos.txt"), or None: a file, folder or pattern
    (one whose name begins with "@" and exists, or matches, is that)."""
    import glob

    if not item.startswith(LIST_PREFIX) or glob.glob(str(Path(item).expanduser())):
        return None
    return Path(item[len(LIST_PREFIX):]).expanduser()


def read_input_list(path: Path) -> list[str]:
    """The inputs a list file names: one per line, blank lines and # comments skipped (a
    byte-order mark and CRLF line ends, as Windows' Notepad saves it, are no part of a name)."""
    return [line.rstrip("\r") for line in Path(path).read_text(encoding="utf-8-sig").split("\n")
            if line.strip() and not line.lstrip().startswith("#")]


def expand_input_lists(inputs: Sequence[str]) -> list[str]:
    """``inputs`` with each list file (``input_list``) replaced by the inputs it names."""
    expanded: list[str] = []
    for item in inputs:
        listed = input_list(item)
        expanded.extend(read_input_list(listed) if listed is not None else [item])
    return expanded


def walk_files(top: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) of every folder under ``top``, in sorted order, following
    linked folders (a class folder linking a folder of photos kept elsewhere: ``os.walk`` and
    ``Path.rglob`` leave them out): each real folder once, and never a link to a folder it is
    inside of (a loop)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for name in sorted(dirnames):
            target = os.path.realpath(os.path.join(dirpath, name))
            inside = (real + os.sep).startswith(target.rstrip(os.sep) + os.sep)  # "/" too
            if target not in seen and not inside:
                keep.append(name)
        dirnames[:] = keep
        yield dirpath, sorted(filenames)


def local_source(url: str) -> Optional[Path]:
    """The local path behind a file: URL (file:///path, file://localhost/path, file:/path) or
    a plain path; None for http(s)."""
    from urllib.parse import unquote, urlparse

    if url.lower().startswith(("http://", "https://")):
        return None
    if url.lower().startswith("file:"):
        return Path(unquote(urlparse(url).path))
    return Path(url).expanduser()


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (for the records petalflow writes)."""
    return utc_at(time.time())


def utc_at(epoch: float) -> str:
    """``utc_now``'s form of the time ``epoch`` (epoch seconds)."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(
        timespec="seconds")


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def log(message: str, *args, level: int = 20) -> None:
    """To the Prefect run's log inside a run (console and UI), else to Python's logging;
    ``level`` as in ``logging`` (20: INFO, 30: WARNING)."""
    try:
        from prefect.logging import get_run_logger

        get_run_logger().log(level, message, *args)
    except Exception:  # noqa: BLE001 - outside a flow or task run
        import logging

        logging.getLogger("petalflow").log(level, message, *args)


# A command imports its stacks on two threads (Prefect on the main one, MLflow and TensorFlow
# on a side thread, to overlap Prefect's temporary server start-up). Both stacks import some of
# the same packages (SQLAlchemy's ORM, OpenTelemetry, ...), and importing a package with
# circular imports on two threads at once can fail ("cannot import name ... from partially
# initialized module 'sqlalchemy.orm.util'", seen once in ~20 `petalflow predict` runs): the
# side thread imports only while holding this lock, which the main thread holds for its own.
IMPORT_LOCK = threading.Lock()
# The side thread `petalflow predict` loads its model on (``predict``); the console script
# ends at once while it still runs (``cli.end_before_side_threads``).
MODEL_PRELOAD_THREAD = "preload-model"
# The packages a command's side thread is importing (``flows.cli._warm_imports``), each with an
# Event set once its import is done: ``imports_settled`` waits for it.
_WARMING: dict[str, threading.Event] = {}


def warming(modules) -> dict[str, threading.Event]:
    """Say that a side thread is about to import ``modules`` (before it starts): their Events,
    for it to set as each import is done."""
    events = {name: threading.Event() for name in modules}
    _WARMING.update(events)
    return events


def imports_settled(package: str) -> None:
    """Wait until a command's side thread has imported ``package``, if one is importing it; at
    once otherwise (a worker's process, a library caller, the side thread done). Called before
    a run's first import of TensorFlow or MLflow: the train command's flow starts while its
    side thread is still importing them, and a submodule imported on the flow's thread
    meanwhile (``tensorflow.core.protobuf.saved_model_pb2``, the backbone's check) took the two
    threads' module locks in opposite orders: "partially initialized module
    'tensorflow.core.protobuf.meta_graph_pb2' ... (most likely due to a circular import)", the
    run failed at its first task (once in 18 runs of the command here)."""
    event = _WARMING.get(package)
    if event is not None:
        event.wait()


# Python's cycle collector during a command's start-up: importing TensorFlow, Prefect and MLflow
# creates ~1 million objects, and each automatic full collection scans all of them (8 during
# the imports, collecting under a thousand objects: imports took 8.2-8.7 s with them, 5.9-6.5 s
# without; bench/startup_gc.py, BENCHMARKS.md). The console script defers full
# collections while it starts (young objects are still collected) and, once its imports are
# done, freezes what they created (``gc.freeze``: kept, never scanned again), so later
# collections, ``release_memory``'s included, scan only what the run creates.
_DEFERRED_THRESHOLD: list = []  # the full-collection threshold to restore, while deferred


def defer_full_collections() -> None:
    """No automatic full collections until ``freeze_start_up``; for a command's processes only
    (the console script and the temporary server it launches), never a library caller's."""
    import gc

    young, middle, full = gc.get_threshold()
    if not _DEFERRED_THRESHOLD:
        _DEFERRED_THRESHOLD.append(full)
        gc.set_threshold(young, middle, 1 << 30)


def freeze_start_up(collect: bool = True) -> None:
    """After ``defer_full_collections``, once the imports are done: collect the start-up's
    garbage (``collect``), then freeze every object alive now out of the collector's scans and
    restore automatic full collections. Does nothing in a process that did not defer them.

    The collection (~0.3 s, on the side thread that imports) keeps the start-up's reference
    cycles (MLflow's store opening, alembic's migration scripts) from being frozen with the
    rest, kept for good: 1.3-2.4 MiB of the train command's peak. ``petalflow predict``, whose
    first prediction waits for its side thread, does without it."""
    import gc

    if _DEFERRED_THRESHOLD:
        if collect:
            gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _DEFERRED_THRESHOLD.pop())


def without_autotuning(dataset):
    """``dataset`` with tf.data's autotuning off. With it on, the end of a pass of a few
    seconds often sat idle for about a second: the iterator's clean-up waits for one of
    tf.data's background threads (1,050 photos' features, 8 passes: 4 ended 1.06-1.15 s late,
    none with autotuning off, passes equally fast; BENCHMARKS.md). petalflow's pipelines set
    their parallelism and prefetch themselves; a ``tf.data.AUTOTUNE`` left in one then means
    tf.data's default, about one call per core."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def release_memory() -> None:
    """Hand memory that a finished step freed back to the operating system: collect Python's
    garbage, then ask glibc's allocator to return its free pages (``malloc_trim``; without it
    a long-lived process keeps its peak footprint). Does nothing where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

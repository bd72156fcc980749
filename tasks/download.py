"""Download and safe extraction of dataset archives.

``download_archive`` streams a URL to ``<name>.part``, verifies its sha256 and renames it into place
atomically; a verified archive already on disk is reused and an interrupted ``.part`` is resumed
with an HTTP Range request. Only network failures raise ``TransientError`` (the Prefect task retries
those); a checksum mismatch or a 4xx answer fails at once.

``extract_archive`` unpacks a .tar/.tgz/.zip into a staging folder and renames it into place. It
refuses absolute paths, ``..``, links, devices, archives larger than a limit and archives of more
files than it allows (``max_entries``), and never writes outside its staging folder.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Optional
from urllib.parse import unquote, urlparse

from prefect import task
from prefect.tasks import exponential_backoff

from petalflow.tasks.common import (
    CHUNK, counted, credentials_advice, file_lock, human_bytes, local_source, log, netrc_file,
    read_json, redact_url, refused_for_now, remove_set_aside, scheme_hint, set_aside,
    sha256_file, source_url, span_words, tls_problem, tree_bytes, unread_folder, utc_at,
    utc_minute, utc_now, walk_files, where_relative, write_json,
)
from petalflow.tasks.dataset import ARCHIVE_SUFFIXES, companion_file, find_data_root
from petalflow.tasks.errors import (
    ArchiveError, ChecksumMismatch, DamagedArchive, DownloadError, LinksInArchive,
    TransientError, WebPageNotArchive, is_transient_status,
)
from petalflow.tasks.serving import text_start, web_page
from petalflow.tasks.space import check_space, disk_full_said, no_space


def _archive_name(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name
    # Room for the ".part" and ".part.json" names of its download beside it.
    return fitting_name(name, NAME_MAX - 16) if name and name not in {".", ".."} else "archive"


# The longest file or folder name, in bytes, that Linux file systems take (ext4, XFS, Btrfs,
# tmpfs: NAME_MAX). Windows and macOS take 255 characters, so a name written there in Chinese
# or Japanese can be three times as long in UTF-8 bytes.
NAME_MAX = 255


def fitting_name(name: str, limit: int = NAME_MAX) -> str:
    """``name`` (a member's path, "/"-separated) with each part longer than ``limit`` bytes of
    UTF-8 shortened to fit: its beginning, "~", 8 hex digits of the whole part's sha256 (two
    long names that begin alike stay two), then its extension. Parts that fit are kept."""
    parts = []
    for part in name.split("/"):
        raw = part.encode("utf-8", "surrogateescape")
        if len(raw) <= limit:
            parts.append(part)
            continue
        stem, dot, ext = part.rpartition(".")
        suffix = f".{ext}" if dot and stem and 0 < len(ext.encode()) <= 16 else ""
        tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
        room = limit - len(tag) - len(suffix.encode())
        head = (stem if suffix else part).encode("utf-8", "surrogateescape")[:room]
        parts.append(head.decode("utf-8", "ignore") + tag + suffix)
    return "/".join(parts)


def _said_shortened(archive: Path, shortened: list[tuple[str, str]]) -> None:
    """The warning for the member names ``fitting_name`` shortened (a class folder's name is
    its label: said apart)."""
    if not shortened:
        return
    folders = sorted({a.split("/")[i] for a, b in shortened
                      for i, (x, y) in enumerate(zip(a.split("/")[:-1], b.split("/")[:-1]))
                      if x != y})
    old, new = shortened[0]
    old, new = old.rsplit("/", 1)[-1], new.rsplit("/", 1)[-1]
    log("%s: %s longer than a file name can be here (%d bytes) shortened to fit, e.g. '%s' -> "
        "'%s'%s", archive.name, counted(len(shortened), "name"), NAME_MAX,
        old if len(old) <= 60 else f"{old[:40]}...{old[-16:]}",
        new if len(new) <= 60 else f"{new[:20]}...{new[-16:]}",
        (f"; folders among them ({', '.join(repr(f[:40] + '...') for f in folders[:3])}): a "
         "class named by such a folder is named by its shortened name") if folders else "",
        level=30)


SOURCE_RECORD = "source.json"


def _part_record(part: Path) -> Path:
    """Where the validators of an in-progress ``.part`` download are kept (for If-Range)."""
    return part.with_name(part.name + ".json")


def _validators(headers) -> dict:
    """The HTTP validators a server sent (None where it sent none)."""
    return {"etag": headers.get("etag"), "last_modified": headers.get("last-modified")}


def source_record(archive: Path) -> dict:
    """What is known about the source of a downloaded archive: url, sha256, the server's
    validators (etag, last_modified), how this run got it (``outcome``: downloaded /
    not modified / unchanged bytes / pinned copy) and when it was checked. Empty for local files."""
    return read_json(Path(archive).with_name(SOURCE_RECORD))


def download_archive(
    url: str,
    downloads_dir: Path,
    sha256: Optional[str] = None,
    timeout_s: float = 60.0,
    on_progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> Path:
    """Fetch ``url`` into ``downloads_dir`` and return the verified local path.

    A local path or file:// URL is used in place (verified when ``sha256`` is given); a folder is
    returned as is. With ``sha256`` (pinned: "exactly these bytes") a verified copy on disk is
    reused without asking the server. Without it the copy of the URL is revalidated on every
    call: a conditional GET (If-None-Match) when the last answer had an ETag, else a HEAD
    whose Last-Modified and size must equal the copy's (``_same_by_head``); 304, or the same
    date and size, reuses it without a body; 200 downloads the new bytes beside the old copy,
    verifies them and switches atomically (the old copy stays usable until then); a server
    that sends no validator is downloaded and compared by hash. ``source.json`` beside the
    copy records the validators, the sha256 and the outcome (see ``source_record``).

    Raises ChecksumMismatch (bad bytes, ``.part`` removed), DownloadError (4xx, unreachable
    file) or TransientError (connection drop, timeout, 5xx: safe to retry).
    """
    source = local_source(url)
    if source is not None:
        if not source.exists():
            raise DownloadError(f"dataset source {url!r} does not exist"
                                f"{scheme_hint(url) or where_relative([str(source)])}")
        if source.is_file() and sha256:
            actual = sha256_file(source)
            if actual != sha256:
                raise ChecksumMismatch(
                    f"sha256 of {url} is {actual}, expected {sha256} (the dataset sha256 "
                    "parameter, --data-sha256 on the command line)"
                )
        return source.resolve()

    expiry = signature_expiry(url)
    if expiry is not None and expiry[0] > time.time():
        log("the dataset URL is presigned: its signature expires %s (in %s); after that, runs "
            "that download it (a schedule, watch-data) fail with HTTP 403 until they are "
            "given a new URL", utc_minute(expiry[0]), span_words(expiry[0] - time.time()), level=30)
    # Keyed by the URL without its secrets: a presigned URL's next signature is the same source
    # (revalidated, not downloaded again into a folder of its own).
    key = sha256 or hashlib.sha256(source_url(url).encode()).hexdigest()[:24]
    target_dir = Path(downloads_dir) / key
    target = target_dir / _archive_name(url)
    record_path = target_dir / SOURCE_RECORD
    with file_lock(target_dir / ".lock"):
        known = read_json(record_path) if target.exists() else {}
        if target.exists() and sha256:
            if sha256_file(target) == sha256:
                write_json(record_path, {**known, "url": url, "sha256": sha256,
                                          "outcome": "pinned copy", "checked_at": utc_now()})
                return target
            target.unlink()  # a corrupt copy on disk: fetch again
            known = {}
        fetched, led_to = _fetch(url, target, known, timeout_s, on_progress,
                                 pinned=bool(sha256))
        # Where a redirect led (a "latest" link, a release asset's storage), as recorded.
        where = {"redirected_to": led_to} if led_to else {}
        if fetched is None:  # 304: the copy on disk is current
            known = {key: value for key, value in known.items() if key != "redirected_to"}
            write_json(record_path, {**known, "url": url, "outcome": "not modified",
                                      "checked_at": utc_now(), **where})
            return target
        part, validators = fetched
        actual = sha256_file(part)
        if sha256 and actual != sha256:
            part.unlink(missing_ok=True)
            _part_record(part).unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"sha256 of {redact_url(url)} is {actual}, expected {sha256}; the partial file was "
                "removed. Check the dataset sha256 (data_sha256, --data-sha256 on the command "
                "line) or the URL."
            )
        outcome = "downloaded"
        if known.get("sha256") == actual and target.exists():
            outcome = "unchanged bytes"  # no validators (or new ones), same content
            part.unlink()
        else:
            os.replace(part, target)  # atomic switch: readers see the old or the new copy
        write_json(record_path, {"url": url, "sha256": actual, **validators,
                                  "outcome": outcome, "checked_at": utc_now(), **where})
        _part_record(part).unlink(missing_ok=True)
        return target


def _shown(url: str) -> str:
    """A URL for a message: ``redact_url``'s, and for another scheme (where a redirect may
    lead) its scheme, host and path only."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme.lower() in ("http", "https"):
        return redact_url(url)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def _led_to(url: str, request_url) -> Optional[str]:
    """Where the redirects from ``url`` led (``request_url``: the URL of the last request),
    for a record or a message (``_shown``); None when there was no redirect."""
    import httpx

    at = str(request_url)
    return None if httpx.URL(url) == httpx.URL(at) else _shown(at)


def _request_url(exc) -> Optional[str]:
    try:
        return str(exc.request.url)
    except RuntimeError:  # raised before a request was made
        return None


def _fetch(url: str, target: Path, known: dict, timeout_s: float, on_progress,
           pinned: bool = False):
    """One conditional GET of ``url``: (None, where) on 304, else ((``.part`` path,
    validators), where); ``where``: the URL redirects led to (``_shown``), None without a
    redirect (when a HEAD answer settled it without a GET: the one ``known`` records).

    An interrupted ``.part`` is resumed with Range + If-Range (its own validators), so a source
    that changed in between is fetched whole instead of being spliced; without validators it is
    resumed only for a pinned download, whose digest check catches a splice."""
    import httpx

    shown = redact_url(url)  # in errors, which reach the flow's state and the Prefect UI
    part = target.with_name(target.name + ".part")
    part_meta_path = _part_record(part)
    part_meta = read_json(part_meta_path) if part.exists() else {}
    # The file's bytes as stored, as curl and wget save them: an archive stored with
    # "Content-Encoding: gzip" (S3 or GCS object metadata, `AddEncoding gzip .tgz`) was
    # decoded on the way, saved as the .tar inside and failed its pinned sha256.
    headers = {"Accept-Encoding": "identity"}
    if known.get("etag"):  # an entity tag matches exactly or not at all
        headers["If-None-Match"] = known["etag"]
    elif known.get("last_modified"):
        # A date is compared for equality, through HEAD: servers answer If-Modified-Since with
        # "not newer" (python -m http.server, Apache, S3), so an archive replaced by an older
        # file (mv, cp -p, ln -s, rsync -a of an earlier export) got 304 on every run and its
        # bytes were never trained on. Only where HEAD tells nothing (a presigned GET URL
        # refuses it; object stores date every upload anew) is the date sent as before.
        same = _same_by_head(url, known, target, timeout_s)
        if same:
            return None, known.get("redirected_to")
        if same is None:
            headers["If-Modified-Since"] = known["last_modified"]
    offset = part.stat().st_size if part.exists() else 0
    resume_with = part_meta.get("etag") or part_meta.get("last_modified")
    if offset and (resume_with or pinned):
        headers["Range"] = f"bytes={offset}-"
        if resume_with:
            headers["If-Range"] = resume_with
    try:
        with httpx.stream(
            "GET", url, headers=headers, timeout=timeout_s, follow_redirects=True,
            auth=download_auth(url),
        ) as resp:
            led_to = _led_to(url, resp.url) if resp.history else None
            if resp.status_code == 304 and known:
                return None, led_to
            if led_to:  # errors say where the URL led: an expired signature, a moved file
                shown = f"{shown} (redirected to {led_to})"
            if resp.status_code == 416:  # our .part is already complete or bogus
                part.unlink(missing_ok=True)
                raise TransientError(f"range not satisfiable for {shown}; restarting download")
            if is_transient_status(resp.status_code):
                raise refused_for_now(resp.status_code, resp.headers.get("retry-after"),
                                      f"from {shown}", _server_says(resp))
            if resp.status_code >= 400 or resp.status_code == 304:
                said = _server_says(resp) if resp.status_code >= 400 else ""
                expired = expired_signature(url)
                raise DownloadError(f"HTTP {resp.status_code} from {shown}"
                                    + (f" ({said})" if said else "")
                                    + (f": {expired}" if expired else
                                       "; check the dataset URL"
                                       + credentials_advice(url, resp.status_code,
                                                            "the archive")))
            validators = _validators(resp.headers)
            resumed = resp.status_code == 206 and offset > 0
            done = offset if resumed else 0
            total = resp.headers.get("content-length")
            total = int(total) + done if total is not None else None
            if total is not None:
                check_space(part.parent, total - done, f"downloading {target.name}",
                            "the download")
            if not resumed:
                write_json(part_meta_path, validators)
            mode = "ab" if resumed else "wb"
            try:
                with open(part, mode) as fh:
                    for block in resp.iter_raw():  # as received: a drop keeps every byte
                        fh.write(block)
                        done += len(block)
                        if on_progress:
                            on_progress(done, total)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:  # a .part that filled the disk is not kept to resume
                if no_space(exc):
                    part.unlink(missing_ok=True)
                    part_meta_path.unlink(missing_ok=True)
                raise
            if total is not None and done < total:
                raise TransientError(f"connection to {shown} closed after {done}/{total} bytes")
    except httpx.TooManyRedirects as exc:  # no network trouble: retrying changes nothing
        raise DownloadError(
            f"{shown} redirects in a loop (redirected again and again, last to "
            f"{_shown(_request_url(exc) or url)}): a server that signs users in "
            "through a browser (cookies, a sign-in page) answers so; use the URL of the archive "
            "itself, or download it and give its path") from exc
    except httpx.UnsupportedProtocol as exc:
        raise DownloadError(
            f"{shown} redirects to {_shown(_request_url(exc) or url)}, which petalflow cannot "
            "download (http and https only): use an http(s) URL of the archive, or download "
            "it and give its path") from exc
    except httpx.TransportError as exc:  # drops, resets, timeouts: keep the .part, resume
        at = _request_url(exc)
        refused = tls_problem(exc, at or url)
        if refused:
            raise DownloadError(refused) from exc
        led_to = _led_to(url, at) if at else None
        where = f" (redirected to {led_to})" if led_to and led_to not in shown else ""
        raise TransientError(f"network error downloading {shown}{where}: {exc}") from exc
    return (part, (part_meta if resumed else validators)), led_to


def signature_expiry(url: str) -> Optional[tuple[float, Optional[float]]]:
    """When a presigned URL stops working, from its own query: (epoch seconds, how long it was
    signed for, or None where the URL does not say). AWS Signature V4 and Google Cloud
    Storage V4 (``X-Amz-Date``/``X-Goog-Date`` plus ``X-Amz-Expires``/``X-Goog-Expires``
    seconds), AWS and Google V2 (``Expires``, epoch seconds, beside a ``Signature``), an Azure
    SAS (``se``, an ISO 8601 time, beside ``sig``). None for any other URL, or values that do
    not parse."""
    from datetime import datetime, timezone
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    query = {key.lower(): value for key, value in parse_qsl(parts.query)}
    try:
        for prefix in ("x-amz-", "x-goog-"):
            if query.get(prefix + "date") and query.get(prefix + "expires"):
                signed = datetime.strptime(query[prefix + "date"], "%Y%m%dT%H%M%SZ")
                valid = float(query[prefix + "expires"])
                return signed.replace(tzinfo=timezone.utc).timestamp() + valid, valid
        if query.get("expires") and "signature" in query:
            return float(query["expires"]), None
        if query.get("se") and "sig" in query:
            ends = datetime.fromisoformat(query["se"])
            return (ends if ends.tzinfo else ends.replace(tzinfo=timezone.utc)).timestamp(), None
    except (ValueError, OverflowError):
        return None
    return None


def expired_signature(url: str) -> Optional[str]:
    """Why a presigned URL whose signature expired (``signature_expiry``) is refused, and what
    to do; None for a URL still valid now, or not presigned."""
    found = signature_expiry(url)
    now = time.time()
    if found is None or found[0] > now:
        return None
    ends, valid = found
    signed = f"; it was signed for {span_words(valid)}" if valid else ""
    return (f"the URL's signature expired {utc_minute(ends)} "
            f"({span_words(now - ends)} ago{signed}): "
            "presign the archive again and give the new URL; a schedule or watch-data needs one "
            "still valid when it runs (give the deployment's data_url a new URL before each "
            "expiry, or a URL that does not expire)")


_ERROR_BODY = 4096  # bytes of an error answer read for what the server says


def download_auth(url: str):
    """httpx's authentication for ``url``: None when the URL carries its own credentials (they
    are used) or the machine has no netrc file, else the netrc file's entry for the URL's host
    (none for that host: no credentials sent). A netrc file that does not parse is a
    DownloadError naming it."""
    import netrc

    import httpx

    path = netrc_file()
    if path is None or urlparse(url).username:
        return None
    try:
        return httpx.NetRCAuth(str(path))
    except (netrc.NetrcParseError, OSError) as exc:
        raise DownloadError(f"cannot read the netrc file {path} (credentials for downloads): "
                            f"{exc}") from None


def _server_says(resp) -> str:
    """An object store's own reason in an error answer (S3's, Google Cloud Storage's and Azure's
    XML ``<Code>`` and ``<Message>``: "AccessDenied: Request has expired"; an API's JSON
    ``message`` or ``error``: GitHub's, Hugging Face's "rate limit exceeded"), from its first
    ``_ERROR_BODY`` bytes; "" for any other answer (an HTML page, nothing)."""
    body = b""
    try:
        for block in resp.iter_raw():
            body += block
            if len(body) >= _ERROR_BODY:
                break
    except Exception:  # noqa: BLE001 - the status alone is the error then
        return ""
    text = body[:_ERROR_BODY].decode("utf-8", "replace")
    found = [re.search(rf"<{tag}>\s*([^<]{{1,300}}?)\s*</{tag}>", text)
             for tag in ("Code", "Message")]
    if not any(found):
        found = [re.match(r'\s*\{.*?"(?:message|error)"\s*:\s*"([^"\\]{1,300})"', text,
                          re.DOTALL)]
    return ": ".join(m[1] for m in found if m)


def _same_by_head(url: str, known: dict, target: Path, timeout_s: float) -> Optional[bool]:
    """Whether the server's HEAD answer for ``url`` has the recorded Last-Modified and the size
    of the copy on disk (True), another date or size (False), or tells neither (None: no 2xx
    answer, no Content-Length, the connection failed: the GET that follows says why)."""
    import httpx

    try:
        resp = httpx.head(url, headers={"Accept-Encoding": "identity"}, timeout=timeout_s,
                          follow_redirects=True, auth=download_auth(url))
        size = int(resp.headers["content-length"])
    except (httpx.HTTPError, KeyError, ValueError, DownloadError):
        return None
    if not 200 <= resp.status_code < 300 or not target.exists():
        return None
    return (resp.headers.get("last-modified") == known["last_modified"]
            and size == target.stat().st_size)


def folder_listing(folder: Path) -> tuple[str, Optional[float]]:
    """(fingerprint, last change) of a folder source, from one listing that reads no file
    contents (the dataset fingerprint, which does, is computed by the scan). The fingerprint:
    sha256 over (relative path, size, mtime) of every file below it the scan may use (not
    hidden files, nor those in hidden or system folders: a Mac's .DS_Store, a NAS's
    thumbnails; nor the files kept beside photos, ``companion_file``: an editor's .xmp
    rewritten when a photo is rated, Windows' Thumbs.db), which changes when such a file is
    added, removed, renamed or rewritten. The last change: the latest status-change
    time (ctime, epoch seconds) of its files and folders, which a copy sets as it writes
    (``cp -p`` and rsync keep the original mtime, not the ctime); None if none could be read."""
    digest = hashlib.sha256()
    folder = Path(folder)
    changed = []
    for dirpath, filenames in walk_files(folder):
        if unread_folder(Path(dirpath).relative_to(folder).parts):
            continue
        with contextlib.suppress(OSError):
            changed.append(os.stat(dirpath).st_ctime)  # an entry added, removed or renamed
        for name in filenames:
            if name.startswith(".") or companion_file(name):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            changed.append(st.st_ctime)
            rel = path.relative_to(folder).as_posix()
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest(), max(changed, default=None)


def describe_source(url: str, archive: Path) -> dict:
    """Provenance of what a run trains on, for MLflow, the summary and change detection:
    ``kind`` (http / file / folder), ``sha256`` of the archive (None for a folder), the HTTP
    validators, outcome and where a redirect led (``redirected_to``, a "latest" link's file
    of the day) for a URL, and the listing fingerprint of a folder.

    Raises ArchiveError (``WebPageNotArchive`` for a sign-in or error page) when a file is no
    tar or zip archive: the watch must not announce such bytes as new data to train on."""
    archive = Path(archive)
    if archive.is_dir():
        fingerprint, last_change = folder_listing(archive)
        return {"kind": "folder", "url": url, "sha256": None,
                "listing_fingerprint": fingerprint, "last_change": last_change}
    try:
        kind = _archive_kind(archive)
    except WebPageNotArchive as exc:
        page = share_page(url)
        led_to = source_record(archive).get("redirected_to") if local_source(url) is None \
            else None
        if page is None and led_to is None:
            raise
        said = (f". This URL is {page}" if page else "") + (
            f". The URL redirected to {led_to}" if led_to else "")
        raise WebPageNotArchive(f"{exc}{said}") from None
    contents = {"contents_sha256": zip_contents_digest(archive)} if kind == "zip" else {}
    if local_source(url) is not None:
        return {"kind": "file", "url": url, "sha256": sha256_file(archive), **contents}
    record = source_record(archive)
    return {"kind": "http", "url": url, "sha256": record.get("sha256") or sha256_file(archive),
            "etag": record.get("etag"), "last_modified": record.get("last_modified"),
            "outcome": record.get("outcome"), "checked_at": record.get("checked_at"),
            "redirected_to": record.get("redirected_to"), **contents}


# The page a browser shows for a file on a code or file host, and where the file itself is:
# (host, path pattern, the host's name, the file's path).
_SHARE_PAGES = (
    ("github.com", re.compile(r"^/([^/]+/[^/]+)/blob/(.+)$"), "GitHub", r"/\1/raw/\2"),
    ("huggingface.co", re.compile(r"^/((?:datasets/|spaces/)?[^/]+/[^/]+)/blob/(.+)$"),
     "Hugging Face", r"/\1/resolve/\2"),
    ("gitlab.com", re.compile(r"^/(.+?)/-/blob/(.+)$"), "GitLab", r"/\1/-/raw/\2"),
)
_DRIVE_ID = re.compile(r"^/file/d/([A-Za-z0-9_-]+)")


def share_page(url: str) -> Optional[str]:
    """What ``url`` is when it is the page a browser shows for a file on GitHub, Hugging Face,
    GitLab, Dropbox or Google Drive, and where the file itself is; None for any other URL.
    Built from the URL's host and path only (its query, which may hold a key, is not
    repeated)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    host = host[4:] if host.startswith("www.") else host
    for known, pattern, name, file_path in _SHARE_PAGES:
        if host == known and pattern.match(parts.path):
            direct = pattern.sub(file_path, parts.path)
            return (f"{name}'s page for the file; the file itself is at "
                    f"https://{parts.hostname}{direct}")
    if host == "dropbox.com" and parse_qs(parts.query).get("dl") != ["1"]:
        return ("Dropbox's preview page; the file itself comes with dl=1 at the end of the "
                "link instead of dl=0")
    if host == "drive.google.com":
        found = _DRIVE_ID.match(parts.path)
        drive_id = found.group(1) if found else (parse_qs(parts.query).get("id") or [None])[0]
        if drive_id:
            return ("Google Drive's page for the file; the file itself is at "
                    f"https://drive.usercontent.google.com/download?id={drive_id}"
                    "&export=download&confirm=t")
    return None


def zip_contents_digest(archive: Path) -> Optional[str]:
    """A digest of a zip's files as its directory lists them (name, size, CRC-32; not their
    times, read without unpacking): the same for a folder zipped again, as servers that zip a
    folder on every request do, whose bytes differ each time. None when it cannot be read."""
    try:
        with zipfile.ZipFile(archive) as zf:
            rows = sorted(f"{zip_member_name(i)}\t{i.file_size}\t{i.CRC:08x}"
                          for i in zf.infolist() if not i.is_dir())
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


# --------------------------------------------------------------------------- extraction


def _check_member_name(name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member {name!r} has an absolute path; refusing to extract")
    if ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} points outside the archive ('..')")


REPACK = "pack the class folders as .tar.gz or .zip"
# What to do with a file that holds its images in a table or arrays, not as image files.
AS_FILES = ("save each image as a file in a folder named after its label, and pack the folders "
            "as .tar.gz or .zip")
# What a file that is not an archive often is, by its first bytes, and what to do: named in
# the error.
NOT_ARCHIVES = (
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", REPACK),
    (b"Rar!\x1a\x07", "a RAR archive", REPACK),
    (b"\x28\xb5\x2f\xfd", "Zstandard-compressed (.zst)", REPACK),
    (b"\x1f\x8b", "gzip-compressed, but not a tar archive inside", REPACK),
    (b"BZh", "bzip2-compressed, but not a tar archive inside", REPACK),
    (b"\xfd7zXZ\x00", "xz-compressed, but not a tar archive inside", REPACK),
    (b"\xff\xd8\xff", "one JPEG image", REPACK),
    (b"\x89PNG\r\n\x1a\n", "one PNG image", REPACK),
    (b"%PDF", "a PDF document", REPACK),
    (b"PAR1", "a Parquet table (how Hugging Face publishes datasets: images and labels in "
              "columns)", AS_FILES),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (arrays, not image files)", AS_FILES),
)
# The compressions a tar comes in: its first bytes, the module that reads it.
COMPRESSED = ((b"\x1f\x8b", "gzip", gzip.GzipFile), (b"BZh", "bzip2", bz2.BZ2File),
              (b"\xfd7zXZ\x00", "xz", lzma.LZMAFile))
# What reading a damaged archive raises (checksums, cut-short streams, bad compressed data),
# and the disk's errors (``_disk_error``).
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
               OSError)


# A file server's page listing a folder: python -m http.server's, nginx's and Apache's titles.
_LISTING_TITLE = re.compile(r"<title>\s*(?:directory listing for|index of)\s", re.IGNORECASE)
_FOLDER_LINK = re.compile(r"""<a\s[^>]*href=["']([^"'?#/][^"'?#]*/)["']""", re.IGNORECASE)


def listed_folders(page: str) -> Optional[list[str]]:
    """The folders a file server's listing page links to (``name/``, each once, in order);
    None when ``page`` is no such listing."""
    from urllib.parse import unquote

    if not _LISTING_TITLE.search(page):
        return None
    found = dict.fromkeys(unquote(link) for link in _FOLDER_LINK.findall(page)
                          if not link.startswith(("../", "./")) and "://" not in link)
    return list(found)


def _not_an_archive(name: str, head: bytes, path: Optional[Path] = None) -> ArchiveError:
    """The error for a file that is neither tar nor zip, saying what it is when its first
    bytes tell: most often a web page where the archive was expected (a sign-in, a download
    confirmation or an error page served with status 200), or the listing of a folder on a
    file server (read from ``path``)."""
    if web_page(head):
        folders = None
        if path is not None:
            with open(path, "rb") as fh:
                folders = listed_folders(fh.read(1 << 18).decode("utf-8", "replace"))
        if folders is not None:
            what = (f"it lists {counted(len(folders), 'folder')}: "
                    f"{', '.join(folders[:8])}{', ...' if len(folders) > 8 else ''}"
                    if folders else "it lists no folder")
            return WebPageNotArchive(
                f"{name} is a folder's listing (a web page), not an archive: the URL is that of "
                f"a folder on the server ({what}); petalflow downloads one archive: pack the "
                f"class folders (tar -czf {name}.tgz {name}/) and give the archive's URL, or "
                "the folder's path where it is mounted")
        return WebPageNotArchive(
            f"{name} is a web page (HTML), not an archive: the URL answered with a page (a "
            "sign-in, a download confirmation or an error page?) instead of the file; use the "
            "URL that downloads the archive itself")
    for magic, kind, todo in NOT_ARCHIVES:
        if head.startswith(magic):
            return ArchiveError(f"{name} is {kind}, not a tar or zip archive: {todo}")
    begins = text_start(head)
    if begins is not None:
        return ArchiveError(
            f"{name} is a text file (it begins {begins!r}), not a tar or zip archive: the URL "
            "of a labels table or a list of files? petalflow downloads one archive of class "
            f"folders: {REPACK}")
    return ArchiveError(
        f"{name} is neither a tar (.tar/.tgz/.tar.gz/.tar.bz2/.tar.xz) nor a zip archive")


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError):
        pass
    for magic, compression, opener in COMPRESSED:
        if head.startswith(magic):
            _check_decompresses(path, compression, opener)
    raise _not_an_archive(path.name, head, path)


def _check_decompresses(path: Path, compression: str, opener, probe: int = 1 << 16) -> None:
    """DamagedArchive when the start of a compressed file that holds no readable tar does not
    decompress (a damaged .tgz is no "gzip of something else")."""
    try:
        with opener(path) as stream:
            stream.read(probe)
    except READ_ERRORS as exc:
        if _disk_error(exc):
            raise
        raise _damaged(path, f"its {compression} data does not decompress: {exc}") from exc


def _disk_error(exc: BaseException) -> bool:
    """An OSError with an errno is the disk's (full, read-only), not the archive's."""
    return isinstance(exc, OSError) and exc.errno is not None


def _damaged(archive: Path, detail) -> DamagedArchive:
    return DamagedArchive(
        f"archive {archive.name} is damaged ({detail}): it was cut short or its bytes "
        "changed, on the way or on disk; nothing was extracted")


def _read_error(archive: Path, exc: BaseException) -> ArchiveError:
    """The error for what reading ``archive`` raised: DamagedArchive unless the disk failed."""
    if _disk_error(exc):
        return ArchiveError(f"cannot extract archive {archive.name}: {exc}")
    if isinstance(exc, tarfile.FilterError):  # the "data" filter refused a member
        return ArchiveError(f"archive {archive.name}: {exc}; refusing")
    if isinstance(exc, zipfile.BadZipFile) and str(exc) == "File is not a zip file":
        return _damaged(archive, "it begins as a zip, but the table of contents at a zip's "
                                 "end is missing")
    return _damaged(archive, exc)


def _read_to_end(stream) -> None:
    """Read a tar's compressed stream past the tar's end, so that its checksum (gzip's CRC-32,
    xz's check; bzip2's per block) is verified: tarfile stops at the tar's end marker, before
    it, and a .tgz with a changed byte was extracted as if whole. Data after a complete gzip
    member that is not another member is ignored, as ``gzip -d`` does (with a warning)."""
    try:
        while stream.read(CHUNK):
            pass
    except gzip.BadGzipFile as exc:
        if not str(exc).startswith("Not a gzipped file"):  # else: trailing data, no member
            raise


def tar_member_name(name: str) -> str:
    """The member's name as its author wrote it. tarfile reads names as UTF-8 and keeps bytes
    that are not UTF-8 (a tar made under a Windows or Latin-1 locale: "café" as b"caf\\xe9")
    as surrogates, which no manifest, JSON or MLflow tag can hold: the scan failed with a
    UnicodeEncodeError. Such names are decoded as cp1252 (Latin-1 where cp1252 has no
    character); valid UTF-8 names are kept."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _EndCheckedTarInfo(tarfile.TarInfo):
    """A TarInfo whose reading notes on the TarFile why its list of members ended
    (``petalflow_end``: the exception tarfile took for the archive's end). tarfile ends the
    list quietly at the end-of-archive block a tar closes with, and just as quietly at a
    header it cannot read (one changed byte fails its checksum) or at the file's end (a tar
    cut where a member begins: an upload still in progress, a copy cut short): every member
    after it was lost, whole class folders among them, and the rest was trained on as if it
    were the dataset."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError,
                tarfile.InvalidHeaderError) as exc:
            tar.petalflow_end = exc
            raise


def _check_tar_ended(archive: Path, tar: tarfile.TarFile, members: list) -> None:
    """DamagedArchive unless the members ended at the tar's end-of-archive block (a zero
    block; one is enough, as GNU tar reads it). A compressed tar's own check (gzip's CRC-32,
    xz's) finds bytes changed on the way; a plain tar has none, nor a tar compressed after it
    was cut."""
    end = getattr(tar, "petalflow_end", None)
    if end is None or isinstance(end, tarfile.EOFHeaderError):
        return
    where = f"after {counted(len(members), 'member')}"
    if isinstance(end, tarfile.InvalidHeaderError):
        detail = f"the header at byte {tar.offset}, {where}, is not a tar header: {end}"
    else:
        detail = (f"it ends at byte {tar.offset}, {where}, without the end-of-archive block a "
                  "tar closes with")
    raise _damaged(archive, detail)


def _symbolic_link(name: str, target: str) -> LinksInArchive:
    """The error for a symbolic link in an archive: class folders of links (to photos kept
    elsewhere) packed as they are hold no photo."""
    return LinksInArchive(
        f"archive member {name!r} is a symbolic link (to {target!r}), not a photo: the archive "
        "holds the link, not the file it points to; pack the files themselves (tar -h, "
        "--dereference; zip without -y, --symlinks)")


ENTRY_BYTES = 4096  # the least a file or folder takes on disk: one block
MIN_ENTRIES = 10_000


def max_entries(max_bytes: int) -> int:
    """How many files and folders an extraction may create: one per 4 KiB of ``max_bytes`` (the
    least each takes on disk), at least 10,000. The byte limit alone let an archive of millions
    of empty files (a few MB compressed) through: it used up the disk's inodes, and the list of
    its members the memory, before any byte counted."""
    return max(MIN_ENTRIES, max_bytes // ENTRY_BYTES)


def _too_many_entries(limit: int, max_bytes: int) -> ArchiveError:
    return ArchiveError(
        f"archive holds more than {limit:,} files and folders (one per 4 KiB of the "
        f"{human_bytes(max_bytes)} extraction limit, the least each takes on disk); refusing "
        "(raise --max-extract-size if this is expected)")


def _tree_size(root: Path) -> tuple[int, int]:
    """The bytes of the files under ``root`` and the count of its files and folders, in one
    walk."""
    size = entries = 0
    for dirpath, dirs, files in os.walk(root):
        entries += len(dirs) + len(files)
        size += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return size, entries


def _extract_tar(archive: Path, dest: Path, max_bytes: int, already: int = 0,
                 entries: int = 0) -> None:
    """Extract ``archive`` into ``dest``; ``already``: bytes extracted before (they count
    toward ``max_bytes``), ``entries``: files and folders (toward ``max_entries``)."""
    limit = max_entries(max_bytes)
    try:
        with tarfile.open(archive, "r:*", tarinfo=_EndCheckedTarInfo) as tar:
            members = []
            for member in tar:  # read one by one: a bomb of empty members stops at the limit
                members.append(member)
                if entries + len(members) > limit:
                    raise _too_many_entries(limit, max_bytes)
            _check_tar_ended(archive, tar, members)
            total = already
            files: dict[str, int] = {}  # the regular files before each member: their sizes
            shortened = []
            for member in members:
                member.name = tar_member_name(member.name)
                _check_member_name(member.name)
                fitted = fitting_name(member.name)
                if fitted != member.name:
                    shortened.append((member.name, fitted))
                    member.name = fitted
                size = member.size
                if member.islnk():  # a file's second name: tar stores its bytes once
                    member.linkname = fitting_name(tar_member_name(member.linkname))
                    if member.linkname not in files:
                        raise ArchiveError(
                            f"archive member {member.name!r} is a hard link to "
                            f"{member.linkname!r}, a file the archive does not hold before "
                            "it; refusing")
                    # Counted as a copy: the scan reads every name's bytes.
                    size = files[member.linkname]
                elif member.issym():
                    raise _symbolic_link(member.name, member.linkname)
                elif not (member.isfile() or member.isdir()):
                    raise ArchiveError(
                        f"archive member {member.name!r} is a device or special file; refusing"
                    )
                elif member.isfile():
                    files[member.name] = member.size
                total += size
                if total > max_bytes:
                    raise ArchiveError(
                        f"archive expands to more than {human_bytes(max_bytes)}; refusing (raise "
                        "--max-extract-size if this is expected)"
                    )
            check_space(dest, total - already, f"extracting {archive.name}",
                        "the extracted datasets")
            # filter="data" is the second line of defence (strips modes, refuses escapes).
            tar.extractall(dest, members=members, filter="data")
            _read_to_end(tar.fileobj)
            _said_shortened(archive, shortened)
    except READ_ERRORS as exc:
        if no_space(exc):  # the disk's: said by the task, once the staging folder is gone
            raise
        raise _read_error(archive, exc) from exc


def zip_member_name(info: zipfile.ZipInfo) -> str:
    """The member's name as its author wrote it. Zips made without the UTF-8 flag (Info-ZIP,
    Windows, macOS) usually still hold UTF-8 bytes, which zipfile reads as cp437: "Crème"
    would become "Cr├¿me" and a class would be renamed. Such names are decoded as UTF-8 when
    they are valid UTF-8, as cp437 otherwise."""
    if info.flag_bits & 0x800:
        name = info.filename
    else:
        try:
            name = info.filename.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            name = info.filename
    # The zip format's separator is "/", but Windows PowerShell 5's Compress-Archive (and
    # .NET's ZipFile before 4.6.1) wrote "\\": "photos\\cats\\1.jpg" extracted as one file
    # of that name at the top, and the dataset had no class folder. "\\" is never part of a
    # folder or file name on Windows, where such zips come from.
    return name.replace("\\", "/")


# The compression methods Python's zip reader reads (stored, deflate, bzip2, lzma).
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
if hasattr(zipfile, "ZIP_ZSTANDARD"):  # Python 3.14 reads Zstandard too
    ZIP_METHODS.add(zipfile.ZIP_ZSTANDARD)
ZIP_METHOD_NAMES = {9: "Deflate64", 93: "Zstandard", 95: "xz", 96: "JPEG", 97: "WavPack",
                    98: "PPMd", 99: "AES-encrypted"}


def _check_zip_readable(name: str, members: list) -> None:
    """ArchiveError, before anything is extracted, for a zip whose files cannot be read here:
    password-protected ones (Python's reader stops at the first with "File <ZipInfo ...> is
    encrypted, password required"), or compressed with a method it lacks (Windows Explorer's
    Deflate64 for large files: "That compression method is not supported")."""
    files = [(info, member) for info, member in members if not member.endswith("/")]
    locked = [member for info, member in files if info.flag_bits & 0x1]
    if locked:
        raise ArchiveError(
            f"{name} is password-protected ({len(locked)} of its {counted(len(files), 'file')} "
            f"{'is' if len(locked) == 1 else 'are'} encrypted, e.g. {locked[0]!r}): petalflow "
            "takes no password; extract it yourself and give the folder as the data URL, or "
            "pack the class folders again without a password")
    unread = [(info.compress_type, member) for info, member in files
              if info.compress_type not in ZIP_METHODS]
    if unread:
        method = unread[0][0]
        windows = "; Windows Explorer writes it for large files" if method == 9 else ""
        raise ArchiveError(
            f"{name} uses a compression Python's zip reader does not read "
            f"({ZIP_METHOD_NAMES.get(method, 'unknown')}, method {method}; "
            f"{counted(len(unread), 'file')}, e.g. {unread[0][1]!r}{windows}): pack the "
            "class folders again as .tar.gz, or as .zip with Deflate (zip -r, or 7-Zip with the "
            "Deflate method)")


def _extract_zip(archive: Path, dest: Path, max_bytes: int, already: int = 0,
                 entries: int = 0) -> None:
    """Extract ``archive`` into ``dest``; ``already``: bytes extracted before (they count
    toward ``max_bytes``), ``entries``: files and folders (toward ``max_entries``)."""
    limit = max_entries(max_bytes)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if entries + len(infos) > limit:
                raise _too_many_entries(limit, max_bytes)
            members = [(info, zip_member_name(info)) for info in infos]
            _check_zip_readable(archive.name, members)
            declared = already
            for info, name in members:
                _check_member_name(name)
            fitted = [(info, fitting_name(name)) for info, name in members]
            shortened = [(name, new) for (_, name), (_, new) in zip(members, fitted)
                         if new != name]
            members = fitted
            for info, name in members:
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    with zf.open(info) as link:  # its target: a path, read no further
                        raise _symbolic_link(name, link.read(1024).decode("utf-8", "replace"))
                kind = stat.S_IFMT(mode)  # 0 when the zip records permissions only
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"archive member {name!r} is a special file")
                declared += info.file_size
                if declared > max_bytes:
                    raise ArchiveError(
                        f"archive expands to more than {human_bytes(max_bytes)}; refusing (raise "
                        "--max-extract-size if this is expected)"
                    )
            check_space(dest, declared - already, f"extracting {archive.name}",
                        "the extracted datasets")
            written = already
            root = dest.resolve()
            for info, name in members:
                out = (dest / name).resolve()
                if root != out and root not in out.parents:
                    raise ArchiveError(f"archive member {name!r} escapes the target")
                if name.endswith("/"):  # a folder entry ("\\"-terminated ones too)
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        written += len(block)
                        if written > max_bytes:  # headers can lie; count what really comes out
                            raise ArchiveError(
                                f"archive expands to more than {human_bytes(max_bytes)}; refusing"
                            )
                        dst.write(block)
            _said_shortened(archive, shortened)
    except zipfile.LargeZipFile as exc:
        raise ArchiveError(f"cannot read archive {archive.name}: {exc}") from exc
    except READ_ERRORS as exc:
        if no_space(exc):  # the disk's: said by the task, once the staging folder is gone
            raise
        raise _read_error(archive, exc) from exc


def _inner_archives(root: Path) -> list[Path]:
    """The archives in an extracted tree that holds no image at all (a download of a download:
    Kaggle's zip around a .tgz, a zip of one zip per class); [] as soon as an image is found.
    macOS metadata (hidden files, ``__MACOSX``) is not counted."""
    from petalflow.tasks.images import IMAGE_SUFFIXES

    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX" and not d.startswith("."))
        for name in sorted(filenames):
            low = name.lower()
            if os.path.splitext(low)[1] in IMAGE_SUFFIXES:
                return []
            if low.endswith(ARCHIVE_SUFFIXES) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return found


def _open_inner_archives(root: Path, max_bytes: int) -> None:
    """Open, in place and once (not the archives they hold), the archives of an extracted
    tree without images: each into a folder named after it (``daisy.zip`` -> ``daisy/``),
    then deleted. What they hold counts toward ``max_bytes`` with the rest of the tree, and
    each is checked like the outer archive."""
    inner = _inner_archives(root)
    if not inner:
        return
    used, entries = _tree_size(root)
    used -= sum(p.stat().st_size for p in inner)
    entries -= len(inner)
    for archive in inner:
        kind = _archive_kind(archive)
        low = archive.name.lower()
        stem = archive.name[: -len(next(s for s in ARCHIVE_SUFFIXES if low.endswith(s)))]
        dest = archive.with_name(stem or "contents")
        while dest.exists():
            dest = dest.with_name(dest.name + "-contents")
        (_extract_zip if kind == "zip" else _extract_tar)(archive, dest, max_bytes, used,
                                                          entries)
        size, count = _tree_size(dest)
        used, entries = used + size, entries + count + 1
        archive.unlink()


def extract_archive(archive: Path, datasets_dir: Path, max_bytes: int = 20 * 1024**3,
                    source: Optional[str] = None, holder: Optional[str] = None) -> Path:
    """Unpack ``archive`` into ``datasets_dir/<digest>`` and return the folder of class folders.
    Archives inside it are opened too when it holds no image (``_open_inner_archives``).
    The digest is the archive's sha256, or for a zip the digest of its files
    (``zip_contents_digest``): a folder zipped anew on every download (new bytes, the same
    files) is extracted, and scanned (``dataset.prepare_dataset``), once.

    With ``source`` (the dataset URL or path the archive came from), this extraction becomes
    that source's current one (``prune_extractions`` keeps it and removes the ones it
    replaced); with ``holder`` (a run's id) it is held in use until ``release_extractions``
    (or the process's end): no prune removes it meanwhile.

    A folder is returned as is (after descending wrappers). Extraction happens in a staging folder
    inside ``datasets_dir`` that is renamed into place only when complete, so a crash never leaves
    a half-extracted dataset that later runs would trust.

    A damaged archive (DamagedArchive) that was downloaded (``source`` a URL) is removed with
    its record: revalidated, the damaged copy would be kept for as long as the server's
    validators stay the same; the next run downloads it again.
    """
    archive = Path(archive)
    if archive.is_dir():
        return find_data_root(archive)
    was = archive.stat()
    try:
        return _extract_archive(archive, Path(datasets_dir), max_bytes, source, holder)
    except DamagedArchive as exc:
        if source is None or local_source(source) is not None or not _discard(archive, was):
            raise
        raise DamagedArchive(f"{exc}; the downloaded copy was removed, and the next run "
                             "downloads it again") from exc


def _discard(archive: Path, was: os.stat_result) -> bool:
    """Remove a downloaded archive and its record, unless the download has been replaced
    since ``was`` (another run switched a new copy in)."""
    with file_lock(archive.parent / ".lock"):
        try:
            now = archive.stat()
        except FileNotFoundError:
            return False
        if (now.st_ino, now.st_mtime_ns) != (was.st_ino, was.st_mtime_ns):
            return False
        archive.unlink()
        (archive.parent / SOURCE_RECORD).unlink(missing_ok=True)
        return True


def _extract_archive(archive: Path, datasets_dir: Path, max_bytes: int, source: Optional[str],
                     holder: Optional[str]) -> Path:
    kind = _archive_kind(archive)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    target = datasets_dir / ((zip_contents_digest(archive) if kind == "zip" else None)
                             or sha256_file(archive))
    with file_lock(datasets_dir / f".{target.name}.lock"):
        # (A zip extracted before "\\" was read as its separator, its files named
        # "a\\b\\c.jpg" at the top, lies under the archive's sha256, no longer used for zips.)
        if target.is_dir() and _inner_archives(target):
            # Extracted before archives inside archives were opened: extracted again, once.
            shutil.rmtree(target)
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{target.name}-", dir=datasets_dir))
            try:
                (_extract_zip if kind == "zip" else _extract_tar)(archive, staging, max_bytes)
                _open_inner_archives(staging, max_bytes)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        # Under the extraction's lock, which a prune takes too: never removed in between.
        if holder is not None:
            _hold(datasets_dir, target.name, holder)
        if source is not None:
            record = _source_record(datasets_dir, source)
            record.parent.mkdir(exist_ok=True)
            write_json(record, {"source": source, "extraction": target.name, "at": utc_now()})
    return find_data_root(target)


# --------------------------------------------------------------------------- superseded extractions

STAGING = ".staging-"
SOURCES = ".sources"
_HELD: dict[str, list] = {}  # holder -> open files whose shared locks mark extractions in use


def source_identity(url: str) -> str:
    """What a dataset source is called in the extraction records: its URL without secrets (a
    presigned URL signed again is the same source: ``common.source_url``), a local path
    resolved."""
    path = local_source(url)
    return str(path.resolve()) if path is not None else source_url(url)


def _source_record(datasets_dir: Path, source: str) -> Path:
    return Path(datasets_dir) / SOURCES / (
        hashlib.sha256(source.encode()).hexdigest()[:24] + ".json")


def _in_use_file(datasets_dir: Path, name: str) -> Path:
    return Path(datasets_dir) / f".{name}.in-use"


def _hold(datasets_dir: Path, name: str, holder: str) -> None:
    """A shared lock on the extraction's in-use file, kept until ``release_extractions``."""
    import fcntl

    fh = open(_in_use_file(datasets_dir, name), "a+")
    fcntl.flock(fh, fcntl.LOCK_SH)
    _HELD.setdefault(holder, []).append(fh)


def release_extractions(holder: str) -> None:
    """Let go of the extractions ``holder`` held (its run is over)."""
    for fh in _HELD.pop(holder, []):
        fh.close()  # closing the file releases its lock


def current_extractions(datasets_dir: Path) -> set[str]:
    """The extraction each recorded source used last."""
    names = set()
    for record in sorted((Path(datasets_dir) / SOURCES).glob("*.json")):
        name = read_json(record).get("extraction")
        if name:
            names.add(name)
    return names


def prune_extractions(datasets_dir: Path) -> list[tuple[str, int]]:
    """Remove the extractions no source uses any more (replaced by a newer archive from the same
    URL or path, or made before extractions were recorded) and staging folders a killed
    extraction left behind; never one a run holds (``extract_archive``'s ``holder``) or one
    being extracted. A source's current extraction stays: the next run on unchanged data
    reuses it and its manifest. Returns (name, bytes) of each folder removed."""
    datasets_dir = Path(datasets_dir)
    if not datasets_dir.is_dir():
        return []
    keep = current_extractions(datasets_dir)
    removed = []
    remove_set_aside(datasets_dir)  # a removal a killed process left half done
    for entry in sorted(datasets_dir.iterdir()):
        if entry.name.startswith(STAGING):
            # ".staging-<digest>-XXXX": stale when nobody extracts that digest now.
            name = entry.name[len(STAGING):].rpartition("-")[0]
            if not name:
                continue  # an older version's staging folder: its digest is not known
        elif entry.name.startswith(".") or entry.name in keep or not entry.is_dir():
            continue
        else:
            name = entry.name
        try:
            with file_lock(datasets_dir / f".{name}.lock", wait=False) as extracting_free:
                if not extracting_free:
                    continue
                with file_lock(_in_use_file(datasets_dir, name), wait=False) as unused:
                    # (Read the records again: a run may have made it current meanwhile.)
                    if (not unused or not entry.is_dir()
                            or entry.name in current_extractions(datasets_dir)):
                        continue
                    size = set_aside(entry)
                    if entry.name == name:
                        _in_use_file(datasets_dir, name).unlink(missing_ok=True)
        except OSError as exc:  # housekeeping: never fails the run that does it
            log("datasets: could not remove %s (%s)", entry, exc, level=30)
            continue
        removed.append((entry.name, size))
    remove_set_aside(datasets_dir)
    return removed


# --------------------------------------------------------------------------- sources not used

UNUSED_SOURCE_DAYS = 45  # more than a month: a monthly schedule keeps its copy between runs


def _days_old(stamp: Optional[str], now: float) -> Optional[float]:
    """How many days before ``now`` the ISO time ``stamp`` (``utc_now``'s) lies; None when it
    is missing or unreadable."""
    import datetime

    try:
        then = datetime.datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    return (now - then.timestamp()) / 86400


def forget_unused_sources(datasets_dir: Path, downloads_dir: Path,
                          days: float = UNUSED_SOURCE_DAYS) -> list[tuple[str, int]]:
    """Let go of the sources no run has used for ``days``: a URL people stopped giving (a
    dated archive each week, a dataset retired) kept its downloaded copy and its extraction
    for ever, since only an archive replaced behind the same URL made one unused. A download
    is used when a run (a training, or ``watch-data`` revalidating it) checked it; an
    extraction record when a training extracted or reused it, or its URL's download was
    checked. Unused records are removed (``prune_extractions`` then removes an extraction no
    other source uses, never one a run holds), and unused download folders emptied but for
    the lock a download waits on (a run waiting on it downloads anew). A source given again
    later is downloaded and extracted again. Returns (download folder, bytes) of each copy
    removed."""
    now = time.time()

    def unused(stamp: Optional[str]) -> bool:
        age = _days_old(stamp, now)
        return age is not None and age > days

    def last_checked(folder: Path, record: dict) -> Optional[str]:
        # A copy never completed (a .part, no record): when one of its files last changed.
        changed = [entry.stat().st_mtime for entry in folder.iterdir() if entry.name != ".lock"]
        return record.get("checked_at") or (utc_at(max(changed)) if changed else None)

    downloads_dir = Path(downloads_dir)
    folders = [folder for folder in sorted(downloads_dir.iterdir())
               if not folder.name.startswith(".") and folder.is_dir()] \
        if downloads_dir.is_dir() else []
    used, removed = set(), []  # the sources whose downloads are in use, the copies removed
    for folder in folders:
        try:
            with file_lock(folder / ".lock", wait=False) as free:
                # (Under the lock: no run checks the copy meanwhile.)
                record = read_json(folder / SOURCE_RECORD)
                if not free or not unused(last_checked(folder, record)):
                    if record.get("url"):  # checked lately, or being downloaded now
                        used.add(source_identity(record["url"]))
                    continue
                entries = [entry for entry in folder.iterdir() if entry.name != ".lock"]
                size = sum(tree_bytes(entry) if entry.is_dir() else entry.stat().st_size
                           for entry in entries)
                for entry in entries:
                    (shutil.rmtree if entry.is_dir() else os.unlink)(entry)
        except OSError as exc:  # housekeeping: never fails the run that does it
            log("downloads: could not remove %s (%s)", folder, exc, level=30)
            continue
        if entries:
            removed.append((folder.name, size))
    records = Path(datasets_dir) / SOURCES
    for path in sorted(records.glob("*.json")) if records.is_dir() else []:
        record = read_json(path)
        if unused(record.get("at")) and record.get("source") not in used:
            path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- Prefect tasks


def _retry_only_transient(task, task_run, state) -> bool:
    """Retry a failed download only for network trouble, never for bad bytes or a 404."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientError)


# Network I/O: retried with exponential backoff (2 s, 4 s, 8 s, 16 s) on transient errors only.
@task(
    name="download-archive",
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_only_transient,
)
def download_archive_task(url: str, downloads_dir: str, sha256: Optional[str] = None) -> str:
    with disk_full_said("downloading the dataset", (Path(downloads_dir), "the downloads")):
        return str(download_archive(url, Path(downloads_dir), sha256))


@task(name="describe-source")
def describe_source_task(url: str, archive: str) -> dict:
    return {"path": archive, **describe_source(url, Path(archive))}


# Network I/O as well: the backbone is fetched once into the shared TF Hub cache, before training.
@task(
    name="fetch-backbone",
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_only_transient,
)
def fetch_backbone_task(handle: str, cache_dir: str, image_size: Optional[int] = None,
                        image_size_set_by: Optional[list[str]] = None) -> str:
    """The backbone's local SavedModel folder; refuses at once an ``image_size`` it does not
    take (a BackboneError is not retried; ``image_size_set_by``: the sweep candidates that
    set it, named in the error), and warns when it looks like a classification model."""
    from petalflow.tasks.model import (
        check_image_size, classification_warning, fetch_backbone, serving_signature,
    )

    path = fetch_backbone(handle, Path(cache_dir))
    signature = serving_signature(Path(path))
    if image_size is not None:
        check_image_size(signature, redact_url(handle), image_size, image_size_set_by)
    warning = classification_warning(signature, redact_url(handle))
    if warning:
        log("%s", warning, level=30)
    return path


@task(name="extract-archive")
def extract_archive_task(archive: str, datasets_dir: str, max_bytes: int,
                         source: Optional[str] = None) -> str:
    """The folder of class folders; the extraction becomes ``source``'s current one and is
    held in use by this flow run until it ends (``housekeeping``)."""
    from prefect.runtime import flow_run

    with disk_full_said(f"extracting {Path(archive).name}",
                        (Path(datasets_dir), "the extracted datasets")):
        return str(extract_archive(Path(archive), Path(datasets_dir), max_bytes, source=source,
                                   holder=str(flow_run.id)))


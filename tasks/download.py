"""Download and safe extraction of dataset archives.

``download_archive`` streams a URL to ``<name>.part``, verifies its sha256 and renames it into place
atomically; a verified archive already on disk is reused and an interrupted ``.part`` is resumed
with an HTTP Range request. Only network failures raise ``TransientError`` (the Prefect task retries
those); a checksum mismatch or a 4xx answer fails at once.

``extract_archive`` unpacks a .tar/.tgz/.zip into a staging folder and renames it into place. It
refuses absolute paths, ``..``, links, devices and archives larger than a limit, and never writes
outside its staging folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional
from urllib.parse import unquote, urlparse

from prefect import task
from prefect.tasks import exponential_backoff

from tasks.errors import (
    ArchiveError, ChecksumMismatch, DownloadError, TransientError, is_transient_status,
)

CHUNK = 1 << 20


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


def local_source(url: str) -> Optional[Path]:
    """The local path behind a file:// URL or a plain path; None for http(s)."""
    if url.lower().startswith(("http://", "https://")):
        return None
    if url.lower().startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return Path(url).expanduser()


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


def _archive_name(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name
    return name if name and name not in {".", ".."} else "archive"


def download_archive(
    url: str,
    downloads_dir: Path,
    sha256: Optional[str] = None,
    timeout_s: float = 60.0,
    on_progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> Path:
    """Fetch ``url`` into ``downloads_dir`` and return the verified local path.

    A local path or file:// URL is used in place (verified when ``sha256`` is given); a folder is
    returned as is. Raises ChecksumMismatch (bad bytes, ``.part`` removed), DownloadError (4xx,
    unreachable file) or TransientError (connection drop, timeout, 5xx: safe to retry).
    """
    source = local_source(url)
    if source is not None:
        if not source.exists():
            raise DownloadError(f"dataset source {url!r} does not exist")
        if source.is_file() and sha256:
            actual = sha256_file(source)
            if actual != sha256:
                raise ChecksumMismatch(
                    f"sha256 of {url} is {actual}, expected {sha256}; check --data-sha256"
                )
        return source.resolve()

    import httpx

    key = sha256 or hashlib.sha256(url.encode()).hexdigest()[:24]
    target_dir = Path(downloads_dir) / key
    target = target_dir / _archive_name(url)
    part = target.with_name(target.name + ".part")
    with file_lock(target_dir / ".lock"):
        if target.exists():
            if sha256 is None or sha256_file(target) == sha256:
                return target
            target.unlink()  # a corrupt copy on disk: fetch again
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with httpx.stream(
                "GET", url, headers=headers, timeout=timeout_s, follow_redirects=True
            ) as resp:
                if resp.status_code == 416:  # our .part is already complete or bogus
                    part.unlink(missing_ok=True)
                    raise TransientError(f"range not satisfiable for {url}; restarting download")
                if is_transient_status(resp.status_code):
                    raise TransientError(f"HTTP {resp.status_code} from {url}")
                if resp.status_code >= 400:
                    raise DownloadError(f"HTTP {resp.status_code} from {url}; check --data-url")
                mode = "ab" if resp.status_code == 206 and offset else "wb"
                done = offset if mode == "ab" else 0
                total = resp.headers.get("content-length")
                total = int(total) + done if total is not None else None
                with open(part, mode) as fh:
                    for block in resp.iter_bytes():  # as received: a drop keeps every byte
                        fh.write(block)
                        done += len(block)
                        if on_progress:
                            on_progress(done, total)
                    fh.flush()
                    os.fsync(fh.fileno())
                if total is not None and done < total:
                    raise TransientError(f"connection to {url} closed after {done}/{total} bytes")
        except httpx.TransportError as exc:  # drops, resets, timeouts: keep the .part, resume
            raise TransientError(f"network error downloading {url}: {exc}") from exc
        actual = sha256_file(part)
        if sha256 and actual != sha256:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"sha256 of {url} is {actual}, expected {sha256}; the partial file was removed. "
                "Check --data-sha256 or the URL."
            )
        os.replace(part, target)
        return target


# --------------------------------------------------------------------------- extraction


def _check_member_name(name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member {name!r} has an absolute path; refusing to extract")
    if ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} points outside the archive ('..')")


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError):
        pass
    raise ArchiveError(f"{path.name} is neither a tar (.tar/.tgz/.tar.gz) nor a zip archive")


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            total = 0
            for member in members:
                _check_member_name(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"archive member {member.name!r} is a link; refusing")
                if not (member.isfile() or member.isdir()):
                    raise ArchiveError(
                        f"archive member {member.name!r} is a device or special file; refusing"
                    )
                total += member.size
                if total > max_bytes:
                    raise ArchiveError(
                        f"archive expands to more than {max_bytes} bytes; refusing (raise "
                        "--max-extract-bytes if this is expected)"
                    )
            # filter="data" is the second line of defence (strips modes, refuses escapes).
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"cannot read archive {archive.name}: {exc}") from exc


def zip_member_name(info: zipfile.ZipInfo) -> str:
    """The member's name as its author wrote it. Zips made without the UTF-8 flag (Info-ZIP,
    Windows, macOS) usually still hold UTF-8 bytes, which zipfile reads as cp437: "Crème"
    would become "Cr├¿me" and a class would be renamed. Such names are decoded as UTF-8 when
    they are valid UTF-8, as cp437 otherwise."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [(info, zip_member_name(info)) for info in zf.infolist()]
            declared = 0
            for info, name in members:
                _check_member_name(name)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"archive member {name!r} is a link; refusing")
                kind = stat.S_IFMT(mode)  # 0 when the zip records permissions only
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"archive member {name!r} is a special file")
                declared += info.file_size
                if declared > max_bytes:
                    raise ArchiveError(
                        f"archive expands to more than {max_bytes} bytes; refusing (raise "
                        "--max-extract-bytes if this is expected)"
                    )
            written = 0
            root = dest.resolve()
            for info, name in members:
                out = (dest / name).resolve()
                if root != out and root not in out.parents:
                    raise ArchiveError(f"archive member {name!r} escapes the target")
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        written += len(block)
                        if written > max_bytes:  # headers can lie; count what really comes out
                            raise ArchiveError(
                                f"archive expands to more than {max_bytes} bytes; refusing"
                            )
                        dst.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"cannot read archive {archive.name}: {exc}") from exc


def find_data_root(folder: Path) -> Path:
    """Descend wrapper folders (``flower_photos/``) to the folder that holds the class folders.

    A folder is a wrapper when it has exactly one class-like subfolder and no other visible entry
    except plain text files (LICENSE.txt, README); hidden entries and archiver metadata
    (``__MACOSX/``) do not count.
    """
    from tasks.dataset import is_class_folder

    folder = Path(folder)
    while True:
        visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
        subdirs = [p for p in visible if is_class_folder(p)]
        others = [p for p in visible if not p.is_dir() and p.suffix.lower() not in {".txt", ".md"}]
        if len(subdirs) == 1 and not others:
            folder = subdirs[0]
            continue
        return folder


def extract_archive(archive: Path, datasets_dir: Path, max_bytes: int = 20 * 1024**3) -> Path:
    """Unpack ``archive`` into ``datasets_dir/<sha256>`` and return the folder of class folders.

    A folder is returned as is (after descending wrappers). Extraction happens in a staging folder
    inside ``datasets_dir`` that is renamed into place only when complete, so a crash never leaves
    a half-extracted dataset that later runs would trust.
    """
    archive = Path(archive)
    if archive.is_dir():
        return find_data_root(archive)
    kind = _archive_kind(archive)
    datasets_dir = Path(datasets_dir)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    target = datasets_dir / sha256_file(archive)
    with file_lock(datasets_dir / f".{target.name}.lock"):
        if target.is_dir():
            return find_data_root(target)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=datasets_dir))
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, staging, max_bytes)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return find_data_root(target)


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
    return str(download_archive(url, Path(downloads_dir), sha256))


# Network I/O as well: the backbone is fetched once into the shared TF Hub cache, before training.
@task(
    name="fetch-backbone",
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_only_transient,
)
def fetch_backbone_task(handle: str, cache_dir: str) -> str:
    from tasks.model import fetch_backbone

    return fetch_backbone(handle, Path(cache_dir))


@task(name="extract-archive")
def extract_archive_task(archive: str, datasets_dir: str, max_bytes: int) -> str:
    return str(extract_archive(Path(archive), Path(datasets_dir), max_bytes))

"""Download and extraction: real HTTP from a local server, archives built by the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Optional

import pytest

from petalflow.tasks.download import download_archive, extract_archive, find_data_root
from petalflow.tasks.errors import ArchiveError, ChecksumMismatch, DownloadError, TransientError
from tests.helpers import COLOURS, make_dataset, make_tgz, make_zip, serve_directory, write_image


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive_dir(tmp_path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    make_tgz(make_dataset(tmp_path / "src", per_class=3), d / "data.tgz")
    return d


def test_http_download_verifies_and_reuses(archive_dir, tmp_path):
    sha = _sha(archive_dir / "data.tgz")
    dest = tmp_path / "downloads"
    assert not dest.exists()
    with serve_directory(archive_dir) as url:
        got = download_archive(f"{url}/data.tgz", dest, sha)
        assert _sha(got) == sha
        assert not list(dest.rglob("*.part"))
        mtime = got.stat().st_mtime_ns
        again = download_archive(f"{url}/data.tgz", dest, sha)
    assert again == got and again.stat().st_mtime_ns == mtime  # reused, not fetched again


def test_checksum_mismatch_fails_and_leaves_no_partial_file(archive_dir, tmp_path):
    dest = tmp_path / "downloads"
    with serve_directory(archive_dir) as url:
        with pytest.raises(ChecksumMismatch, match="expected 0{64}"):
            download_archive(f"{url}/data.tgz", dest, "0" * 64)
    assert [p for p in dest.rglob("*") if p.is_file() and p.name != ".lock"] == []


def test_an_archive_stored_with_content_encoding_gzip_is_saved_as_stored(tmp_path):
    """An object store holding photos.tgz with the metadata "Content-Encoding: gzip" (or a web
    server told `AddEncoding gzip .tgz`) sends it with that header: the bytes saved are the
    archive's own (what `sha256sum photos.tgz` pins), not the .tar httpx would decode them
    into."""
    import http.server

    from tests.helpers import base_url, serve_handler

    data = make_tgz(make_dataset(tmp_path / "src", per_class=3), tmp_path / "p.tgz").read_bytes()
    asked = []

    class Store(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server API
            asked.append(self.headers.get("Accept-Encoding"))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serve_handler(Store) as server:
        url = f"{base_url(server)}/photos.tgz"
        pinned = download_archive(url, tmp_path / "pinned", hashlib.sha256(data).hexdigest())
        followed = download_archive(url, tmp_path / "followed")
    assert pinned.read_bytes() == data and followed.read_bytes() == data
    assert asked == ["identity", "identity"]
    assert sorted(p.name for p in extract_archive(followed, tmp_path / "ds").iterdir()) == \
        ["blue", "green", "red"]


def _presigned(base: str, signed_at: float, signature: str, valid_s: int = 604800) -> str:
    """An S3 presigned GET URL's query (Signature V4) as `aws s3 presign` writes it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at))
    return (f"{base}/bucket/photos.tgz?X-Amz-Algorithm=AWS4-HMAC-SHA256&"
            f"X-Amz-Credential=AKIDSECRET%2F{stamp[:8]}%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={stamp}&X-Amz-Expires="
            f"{valid_s}&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}")


def test_a_presigned_url_signed_again_is_one_source_and_its_expiry_is_said(tmp_path, caplog):
    """An object store's presigned URL (`aws s3 presign`, which petalflow's own hint for s3://
    suggests, 7 days) is signed anew with a new date and signature: each signing was another
    source, downloaded whole into a folder of its own (the watch announced a change that was
    none). And once it expired, every scheduled run failed "HTTP 403 …; check the dataset URL",
    S3's own reason dropped. Now: one source, revalidated (304); each run says when the URL
    expires; an expired one is refused saying so, what S3 said, and what to do, the copy on
    disk kept."""
    import calendar
    import http.server
    from urllib.parse import parse_qs, urlsplit

    from petalflow.tasks.common import source_url
    from petalflow.tasks.download import signature_expiry
    from petalflow.tasks.watch import resource_id
    from tests.helpers import base_url, serve_handler

    data = make_tgz(make_dataset(tmp_path / "src", per_class=3), tmp_path / "p.tgz").read_bytes()
    etag = '"%s"' % hashlib.md5(data).hexdigest()
    answers = []

    class S3(http.server.BaseHTTPRequestHandler):  # checks a V4 query's date, as S3 does
        def log_message(self, *args):
            pass

        def do_HEAD(self):  # noqa: N802 - a URL presigned for GET is refused for HEAD
            self.send_response(403)
            self.end_headers()

        def do_GET(self):  # noqa: N802
            q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            signed = calendar.timegm(time.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            if signed + int(q["X-Amz-Expires"]) < time.time():
                body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied'
                        b'</Code><Message>Request has expired</Message><X-Amz-Expires>604800'
                        b'</X-Amz-Expires></Error>')
                answers.append(403)
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            same = self.headers.get("If-None-Match") == etag
            answers.append(304 if same else 200)
            self.send_response(304 if same else 200)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", "0" if same else str(len(data)))
            self.end_headers()
            if not same:
                self.wfile.write(data)

    now = time.time()
    dest = tmp_path / "downloads"
    with serve_handler(S3) as server:
        base = base_url(server)
        first = _presigned(base, now - 3600, "f00d1")
        resigned = _presigned(base, now - 60, "beef2")
        expired = _presigned(base, now - 9 * 86400, "dead3")
        with caplog.at_level("WARNING", logger="petalflow"):
            copy = download_archive(first, dest)
        assert [r.getMessage() for r in caplog.records] == [
            "the dataset URL is presigned: its signature expires "
            + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now - 3600 + 604800))
            + " (in 7 days); after that, runs that download it (a schedule, watch-data) fail "
            "with HTTP 403 until they are given a new URL"]
        assert download_archive(resigned, dest) == copy  # the same folder, revalidated
        with pytest.raises(DownloadError) as refused:
            download_archive(expired, dest)
    assert answers == [200, 304, 403]
    assert copy.read_bytes() == data and [p.name for p in dest.iterdir()] == [copy.parent.name]
    shown_query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date="
                   + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - 9 * 86400))
                   + "&X-Amz-Expires=604800&X-Amz-SignedHeaders=***&X-Amz-Signature=***")
    assert str(refused.value) == (
        f"HTTP 403 from {base}/bucket/photos.tgz?{shown_query} (AccessDenied: Request has "
        "expired): the URL's signature expired "
        + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now - 9 * 86400 + 604800))
        + " (2 days ago; it was signed for 7 days): presign the archive again and give the new "
        "URL; a schedule or watch-data needs one still valid when it runs (give the "
        "deployment's data_url a new URL before each expiry, or a URL that does not expire)")
    # The watch's events and state: one source too.
    assert resource_id(first) == resource_id(resigned) == resource_id(expired)
    assert source_url(first) == (f"{base}/bucket/photos.tgz?X-Amz-Algorithm=AWS4-HMAC-SHA256&"
                                 "X-Amz-Credential=***&X-Amz-SignedHeaders=***&"
                                 "X-Amz-Signature=***")
    # Google Cloud Storage V4 and V2, AWS V2, an Azure SAS; parameters of the same names in a
    # URL that is not presigned are part of what it names.
    gcs = ("https://storage.googleapis.com/b/p.tgz?X-Goog-Algorithm=GOOG4-RSA-SHA256&"
           "X-Goog-Credential=sa%40p.iam.gserviceaccount.com%2F20261120%2Fauto%2Fstorage%2F"
           "goog4_request&X-Goog-Date=20261120T100000Z&X-Goog-Expires=86400&"
           "X-Goog-SignedHeaders=host&X-Goog-Signature=0a1b")
    signed = calendar.timegm((2026, 11, 20, 10, 0, 0))
    assert signature_expiry(gcs) == (signed + 86400.0, 86400.0)
    v2 = "https://b.s3.amazonaws.com/p.tgz?AWSAccessKeyId=AKID&Expires=1796000000&Signature=x"
    assert signature_expiry(v2) == (1796000000.0, None)
    assert source_url(v2) == "https://b.s3.amazonaws.com/p.tgz?AWSAccessKeyId=***&Signature=***"
    sas = ("https://acct.blob.core.windows.net/c/p.zip?sv=2022-11-02&st=2026-11-20T10%3A00%3A00Z"
           "&se=2026-11-27T10%3A00%3A00Z&sr=b&sp=r&sig=abc%3D")
    assert signature_expiry(sas) == (signed + 7 * 86400.0, None)
    assert source_url(sas) == ("https://acct.blob.core.windows.net/c/p.zip?sv=2022-11-02&sr=b&"
                               "sp=r&sig=***")
    assert signature_expiry("https://x.org/p.tgz?Expires=3") is None
    assert source_url("https://x.org/p.tgz?expires=3&se=4") == "https://x.org/p.tgz?expires=3&se=4"


def test_404_is_a_permanent_error(archive_dir, tmp_path):
    with serve_directory(archive_dir) as url:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_archive(f"{url}/missing.tgz", tmp_path / "d")


def test_credentials_come_from_the_netrc_file_and_stay_on_their_host(archive_dir, tmp_path,
                                                                      monkeypatch):
    """A private archive's credentials in the machine's netrc file (as curl, wget, pip and git
    read them) instead of the URL, which a run's parameters hold and Prefect's UI shows: the
    download sends them to that host only (not to a host it is redirected to, such as an
    object store's signed URL), the URL's own credentials win, and a 401 says where to put
    them, or that those given were refused."""
    from tests.helpers import base_url, private_server

    body = (archive_dir / "data.tgz").read_bytes()
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))  # no file there yet
    with private_server({"/private/data.tgz": body}, "reader", "s3cret") as private, \
            private_server({"/data.tgz": body}, "-", "-") as store:
        url = f"{base_url(private)}/private/data.tgz"
        with pytest.raises(DownloadError) as refused:
            download_archive(url, tmp_path / "d1")
        assert str(refused.value) == (
            f"HTTP 401 from {url}; check the dataset URL; if the archive needs credentials, "
            "give them for 127.0.0.1 in the netrc file of the machine that downloads "
            "(~/.netrc, or the file $NETRC names: `machine 127.0.0.1 login USER password "
            "TOKEN`), which keeps them out of the URL and the run's parameters")
        netrc.write_text("machine 127.0.0.1 login reader password wrong\n")
        with pytest.raises(DownloadError, match=(
                f"HTTP 401 from {url}; check the dataset URL; the server refused the "
                f"credentials for 127.0.0.1 in {netrc}$")):
            download_archive(url, tmp_path / "d2")
        # The URL's own credentials win over the file's.
        with_own = url.replace("http://", "http://reader:s3cret@")
        assert download_archive(with_own, tmp_path / "d3").read_bytes() == body
        netrc.write_text("machine 127.0.0.1 login reader password s3cret\n")
        assert download_archive(url, tmp_path / "d4").read_bytes() == body
        private.redirects["/private/moved.tgz"] = f"{base_url(store)}/data.tgz"
        private.seen.clear()
        assert download_archive(f"{base_url(private)}/private/moved.tgz",
                                tmp_path / "d5").read_bytes() == body
        assert len(private.seen) == 1 and len(store.seen) == 1, (private.seen, store.seen)
        assert private.seen[0][1] and store.seen[0][1] is None  # not sent on to the other host
        netrc.write_text("machine\n")
        with pytest.raises(DownloadError, match=f"cannot read the netrc file {netrc}"):
            download_archive(url, tmp_path / "d6")


def test_unreachable_server_is_transient(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        download_archive(f"http://127.0.0.1:{port}/x.tgz", tmp_path / "d", timeout_s=5)


def test_local_path_and_file_url(archive_dir, tmp_path):
    archive = archive_dir / "data.tgz"
    assert download_archive(str(archive), tmp_path / "d", _sha(archive)) == archive.resolve()
    assert download_archive(archive.as_uri(), tmp_path / "d") == archive.resolve()
    for url in (f"file://localhost{archive}", f"file:{archive}", f"FILE://{archive}"):
        assert download_archive(url, tmp_path / "d") == archive.resolve(), url
    with pytest.raises(ChecksumMismatch):
        download_archive(str(archive), tmp_path / "d", "1" * 64)
    with pytest.raises(DownloadError, match="does not exist"):
        download_archive(str(tmp_path / "nope.tgz"), tmp_path / "d")


@pytest.mark.parametrize("given, means", [
    ("example.com/data/photos.tgz", "https://example.com/data/photos.tgz"),
    ("www.example.org/photos.zip", "https://www.example.org/photos.zip"),
    ("localhost:8000/photos.tgz", "http://localhost:8000/photos.tgz"),
    ("192.168.1.20:8080/photos.tgz", "http://192.168.1.20:8080/photos.tgz"),
    ("tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5",
     "https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5"),
])
def test_a_web_address_without_its_scheme_is_said_to_need_one(tmp_path, monkeypatch, given,
                                                              means):
    """A web address typed or pasted without http(s):// (a form, a chat message) is read as a
    local path, which does not exist: the dataset's error (at run time: a path may exist on
    the worker only) and the backbone's (at validation) say which URL it may have meant. Before:
    "dataset source 'example.com/data/photos.tgz' does not exist" alone."""
    from pydantic import ValidationError

    from petalflow.tasks.errors import DownloadError
    from petalflow.tasks.params import TrainParams

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError) as missing:
        download_archive(given, tmp_path / "d")
    assert str(missing.value) == (
        f"dataset source {given!r} does not exist; a web address needs its scheme: {means}")
    with pytest.raises(ValidationError, match=f"a web address needs its scheme: {means}"):
        TrainParams(backbone=given)


def test_a_missing_path_that_is_no_web_address_gets_no_such_suggestion(tmp_path, monkeypatch):
    """...but a relative one is said to start from the working folder (a deployment's run
    starts from its worker's, which whoever typed the path in the UI does not see)."""
    import os

    from petalflow.tasks.errors import DownloadError

    monkeypatch.chdir(tmp_path)
    here = f" (relative paths start from {os.getcwd()})"
    for given, relative in (("photos.tgz", True), ("data/photos", True),
                            ("./photos.tgz", True), ("/srv/data/photos.tgz", False),
                            ("~/photos.tgz", False), ("C:/photos.tgz", True),
                            ("file:///srv/photos.tgz", False)):
        with pytest.raises(DownloadError) as missing:
            download_archive(given, tmp_path / "d")
        assert str(missing.value) == (f"dataset source {given!r} does not exist"
                                      + (here if relative else "")), given


def test_a_file_url_with_two_slashes_is_refused_not_read_as_the_current_folder(
        workspace, capsys):
    """``file://photos.tgz`` names the host "photos.tgz" and an empty path: it was read as the
    current folder, scanned as the dataset ("need at least 2 classes ..., put each class's
    images in its own subfolder"). Refused before any work, saying how to write it."""
    from petalflow.flows.cli import main

    make_tgz(make_dataset(workspace / "src", per_class=4), workspace / "photos.tgz")
    for url, path in (("file://photos.tgz", "photos.tgz"), ("file://./photos.tgz",
                                                            "./photos.tgz")):
        assert main(["train", "--data-url", url]) == 2
        err = capsys.readouterr().err
        assert (f"--data-url: Value error, '{url}' names the host '{path.split('/')[0]}', not a "
                f"file: a file URL takes three slashes and an absolute path "
                f"(file:///data/photos.tgz), or give the path itself ('{path}')") in err
    assert main(["train", "--data-url", "file:photos.tgz"]) == 2
    assert "has no absolute path" in capsys.readouterr().err
    assert not (workspace / "mlflow").exists()


def test_extracts_tgz_and_zip_and_finds_class_folders(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=2)
    for maker, name in ((make_tgz, "a.tgz"), (make_zip, "a.zip")):
        archive = maker(src, tmp_path / name)
        root = extract_archive(archive, tmp_path / "datasets")
        assert sorted(p.name for p in root.iterdir()) == ["blue", "green", "red"]
    assert not list((tmp_path / "datasets").glob(".staging-*"))


def _tar_with(tmp_path: Path, add) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        add(tar)
    return path


def _file(tar, name, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "add, message",
    [
        (lambda t: _file(t, "photos/../../escaped.txt"), r"\.\."),
        (lambda t: _file(t, "/tmp/petalflow-absolute.txt"), "absolute"),
        (lambda t: _file(t, "photos/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "link"),
        (lambda t: _file(t, "photos/hard", kind=tarfile.LNKTYPE, linkname="photos/x"), "link"),
        (lambda t: _file(t, "photos/dev", kind=tarfile.CHRTYPE), "device"),
    ],
)
def test_unsafe_tar_is_refused_and_nothing_written_outside(tmp_path, add, message):
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar_with(work, lambda t: (_file(t, "photos/ok/a.txt"), add(t)))
    datasets = work / "datasets"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ArchiveError, match=message):
        extract_archive(archive, datasets)
    after = set(tmp_path.rglob("*"))
    # Only the (empty) datasets folder and its lock file may appear; no dataset, no escapee.
    assert {p for p in after - before if p.name != ".lock" and not p.name.endswith(".lock")} <= {
        datasets}
    assert not Path("/tmp/petalflow-absolute.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_a_tar_of_a_folder_with_hard_links_is_extracted_whole(tmp_path):
    """A file with two names in the packed folder (deduplicated with hard links: ``cp -l``,
    ``jdupes -L``, a script that links each photo into its class folder) is stored by tar
    once, then as a hard link to that member: the whole archive was refused ("is a link").
    Such a link is that file under its second name and is extracted; one to a file the
    archive does not hold before it stays refused (the parametrized test above)."""
    from petalflow.tasks.dataset import prepare_dataset

    folder = make_dataset(tmp_path / "photos", per_class=4)
    photo = folder / "red" / "000.jpg"
    os.link(photo, folder / "red" / "000-again.jpg")
    os.link(folder / "blue" / "001.jpg", folder / "green" / "from-blue.jpg")
    archive = tmp_path / "photos.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="photos")
    with tarfile.open(archive) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.islnk()) == [
            "photos/green/from-blue.jpg", "photos/red/000.jpg"]  # tar's order: red's 2nd name
    root = extract_archive(archive, tmp_path / "datasets")
    for name in ("red/000.jpg", "red/000-again.jpg", "green/from-blue.jpg"):
        assert (root / name).read_bytes() == (folder / name).read_bytes()
    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"]
    # The same photo under two classes is quarantined (both names), as with any copy; twice
    # in one class, both used (one group: always in one split).
    assert info["counts"]["quarantined"] == 2 and info["counts"]["used"] == 14 - 2
    # Each name counts toward the size limit as a copy would (the scan reads every name):
    # a file linked a million times is no way past it.
    with tarfile.open(archive) as tar:
        stored = sum(m.size for m in tar.getmembers() if m.isfile())
        linked = sum(tar.getmember(m.linkname).size for m in tar.getmembers() if m.islnk())
    extract_archive(archive, tmp_path / "limit-ok", max_bytes=stored + linked)
    with pytest.raises(ArchiveError, match="expands to more than"):
        extract_archive(archive, tmp_path / "limit", max_bytes=stored + linked - 1)


def test_a_tar_or_zip_of_symbolic_links_is_refused_saying_how_to_pack_the_files(tmp_path):
    """Class folders of symbolic links (to the photos kept elsewhere) packed as they are:
    the archive holds links, not photos. Refused, saying what the link points to and how to
    pack the files instead (before: "is a link; refusing", and the layout hint)."""
    from petalflow.flows.cli import EXIT_DATA, explain_failure

    folder = make_dataset(tmp_path / "photos", per_class=3)
    (folder / "red" / "extra.jpg").symlink_to("../../elsewhere/extra.jpg")
    archive = tmp_path / "photos.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="photos")
    with pytest.raises(ArchiveError) as tarred:
        extract_archive(archive, tmp_path / "datasets")
    assert str(tarred.value) == (
        "archive member 'photos/red/extra.jpg' is a symbolic link (to "
        "'../../elsewhere/extra.jpg'), not a photo: the archive holds the link, not the file it "
        "points to; pack the files themselves (tar -h, --dereference; zip without -y, "
        "--symlinks)")
    failed = explain_failure(tarred.value)
    assert failed.code == EXIT_DATA and "layout" not in failed.hint
    assert "tar -czhf" in failed.hint
    zipped = tmp_path / "photos.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        info = zipfile.ZipInfo("photos/red/extra.jpg")
        info.external_attr = (0o120777 << 16)  # a symbolic link, as zip -y stores it
        zf.writestr(info, "../../elsewhere/extra.jpg")
    with pytest.raises(ArchiveError, match=r"^archive member 'photos/red/extra.jpg' is a "
                       r"symbolic link \(to '../../elsewhere/extra.jpg'\), not a photo"):
        extract_archive(zipped, tmp_path / "datasets2")
    assert not list((tmp_path / "datasets").rglob("*.jpg"))


def test_zip_traversal_and_bomb_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("photos/a/ok.txt", "fine")
        zf.writestr("../../zip-escaped.txt", "bad")
    with pytest.raises(ArchiveError, match=r"\.\."):
        extract_archive(evil, tmp_path / "datasets")
    assert not (tmp_path.parent / "zip-escaped.txt").exists()

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photos/a/zeros.bin", b"\0" * 5_000_000)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ArchiveError, match="more than 1000000 bytes"):
        extract_archive(bomb, tmp_path / "datasets2", max_bytes=1_000_000)
    assert [p for p in (tmp_path / "datasets2").iterdir() if not p.name.endswith(".lock")] == []



def test_an_archive_of_millions_of_empty_files_is_refused_by_their_count(tmp_path):
    """The byte limit alone let an archive of empty files through (each counted 0 bytes): a
    few MB of .tgz held millions of them, which used up the disk's inodes and, as a list of
    members, the memory. Now an extraction creates at most one file or folder per 4 KiB of
    the limit (at least 10,000), counted as the tar is read, across archives in the archive
    too; nothing is left extracted."""
    import io
    import tarfile

    from petalflow.tasks.download import max_entries

    assert max_entries(20 * 1024**3) == 5_242_880 and max_entries(1_000_000) == 10_000

    def empty_files(archive: Path, n: int, top: str = "photos") -> Path:
        with tarfile.open(archive, "w:gz") as tar:
            for i in range(n):
                tar.addfile(tarfile.TarInfo(f"{top}/c{i % 3}/{i}.jpg"), io.BytesIO(b""))
        return archive

    many = empty_files(tmp_path / "many.tgz", 50_000)
    assert many.stat().st_size < 400_000
    message = (r"^archive holds more than 10,000 files and folders \(one per 4 KiB of the "
               r"1000000 bytes \(976\.6 KiB\) extraction limit, the least each takes on "
               r"disk\); refusing \(raise "
               r"--max-extract-size if this is expected\)$")
    with pytest.raises(ArchiveError, match=message):
        extract_archive(many, tmp_path / "datasets", max_bytes=1_000_000)
    left = [p for p in (tmp_path / "datasets").rglob("*") if not p.name.endswith(".lock")]
    assert left == []
    # The same in a zip, and in archives inside a zip (each under the limit, not together).
    zipped = tmp_path / "many.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for i in range(10_001):
            zf.writestr(f"photos/c{i % 3}/{i}.jpg", b"")
    with pytest.raises(ArchiveError, match=message):
        extract_archive(zipped, tmp_path / "datasets2", max_bytes=1_000_000)
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        for part in ("a", "b"):
            zf.write(empty_files(tmp_path / f"{part}.tgz", 6_000, top=part), f"{part}.tgz")
    with pytest.raises(ArchiveError, match=message):
        extract_archive(outer, tmp_path / "datasets3", max_bytes=1_000_000)
    left = [p for p in (tmp_path / "datasets3").rglob("*") if not p.name.endswith(".lock")]
    assert left == []
    # Under the limit, the same kind of archive extracts.
    root = extract_archive(empty_files(tmp_path / "fine.tgz", 9_000), tmp_path / "datasets4",
                           max_bytes=1_000_000)
    assert sum(1 for _ in root.rglob("*.jpg")) == 9_000

def test_truncated_and_non_archives_are_refused(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    good = make_tgz(src, tmp_path / "good.tgz")
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError):
        extract_archive(cut, tmp_path / "datasets")
    text = tmp_path / "notes.tgz"
    text.write_bytes(bytes(range(1, 200)))
    with pytest.raises(ArchiveError, match="neither a tar"):
        extract_archive(text, tmp_path / "datasets")
    # What a file that is not an archive is, when its first bytes tell.
    kinds = {
        "page.zip": (b"\xef\xbb\xbf  <!doctype HTML><html>", "is a web page (HTML), not an "
                     "archive: the URL answered with a page (a sign-in, a download "
                     "confirmation or an error page?) instead of the file"),
        "photos.7z": (b"7z\xbc\xaf\x27\x1c\x00\x04", "is a 7-Zip archive, not a tar or zip "
                      "archive: pack the class folders as .tar.gz or .zip"),
        "photos.rar": (b"Rar!\x1a\x07\x01\x00", "is a RAR archive, not a tar or zip archive"),
        "photos.tar.zst": (b"\x28\xb5\x2f\xfd\x04", "is Zstandard-compressed (.zst), not a tar"),
        "one.tgz": (gzip.compress(b"just some text"), "is gzip-compressed, but not a tar archive "
                    "inside, not a tar or zip archive"),
        "photo.tgz": ((src / "red" / "000.jpg").read_bytes(), "is one JPEG image, not a tar"),
        # A Hugging Face dataset's table (its "Download" link), arrays in HDF5, the labels
        # table's URL given for the archive's.
        "train-00000-of-00001.parquet": (_hugging_face_parquet(src), (
            "is a Parquet table (how Hugging Face publishes datasets: images and labels in "
            "columns), not a tar or zip archive: save each image as a file in a folder named "
            "after its label, and pack the folders as .tar.gz or .zip")),
        "images.h5": (b"\x89HDF\r\n\x1a\n\x00\x00", "is an HDF5 file (arrays, not image "
                      "files), not a tar or zip archive: save each image as a file"),
        "labels.csv": ("\ufeffimage,label\n000.jpg,r\u00f8d\n".encode() * 40, (
            "is a text file (it begins 'image,label'), not a tar or zip archive: the URL of "
            "a labels table or a list of files? petalflow downloads one archive of class "
            "folders: pack the class folders as .tar.gz or .zip")),
    }
    for name, (head, says) in kinds.items():
        (tmp_path / name).write_bytes(head + (b"" if name.endswith(".csv") else bytes(600)))
        with pytest.raises(ArchiveError) as refused:
            extract_archive(tmp_path / name, tmp_path / "datasets")
        assert str(refused.value).startswith(f"{name} {says}"), str(refused.value)
    assert [p for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def _hugging_face_parquet(src: Path) -> bytes:
    """A table as Hugging Face's hub serves an image dataset: an ``image`` struct column
    (bytes, path) and a ``label`` column."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = sorted(src.rglob("*.jpg"))
    table = pa.table({
        "image": [{"bytes": p.read_bytes(), "path": p.name} for p in photos],
        "label": [sorted({q.parent.name for q in photos}).index(p.parent.name) for p in photos]})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _changed_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _wrong_crc(tgz: bytes) -> bytes:
    """A .tgz whose every byte decompresses as before but whose gzip CRC-32 (in its last 8
    bytes, before the length) disagrees: only reading the stream to its end tells."""
    return tgz[:-8] + bytes([tgz[-8] ^ 0xFF]) + tgz[-7:]


def _damaged_variants(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the error says in its parentheses; "" where that depends on
    where the changed byte falls, which the archive's timestamps move): archives of the same
    three images per class, cut short or with one byte changed."""
    src = make_dataset(tmp_path / "src", per_class=3)
    tgz = make_tgz(src, tmp_path / "good.tgz").read_bytes()
    stored = make_zip(src, tmp_path / "good.zip").read_bytes()
    xz = tmp_path / "good.tar.xz"
    with tarfile.open(xz, "w:xz") as tar:
        tar.add(src, arcname="photos")
    xz_bytes = xz.read_bytes()
    with zipfile.ZipFile(tmp_path / "good.zip") as zf:
        second = zf.infolist()[1]  # a photo: its bytes start after its local header
    in_photo = second.header_offset + 30 + len(second.filename) + 100
    plain = tmp_path / "good.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(src, arcname="photos")
    with tarfile.open(plain) as tar:  # where the last class folder's first photo begins
        members = tar.getmembers()
    last = [m for m in members if m.isfile()][-3].offset
    tar_bytes = plain.read_bytes()
    lost = f"at byte {last}, after {sum(m.offset < last for m in members)} members"
    return {
        # tarfile ends a plain tar's members quietly where a header is missing or invalid:
        # these were extracted without their last class folder, and trained on.
        "cut-at-member.tar": (tar_bytes[:last], f"it ends {lost}, without the end-of-archive "
                              "block a tar closes with"),
        "changed-header.tar": (_changed_byte(tar_bytes, last + 2), f"the header {lost}, is "
                               "not a tar header: bad checksum"),
        "cut-then-compressed.tgz": (gzip.compress(tar_bytes[:last]), f"it ends {lost},"),
        # tarfile stops at the tar's end marker, before gzip's CRC-32: these were extracted.
        "wrong-crc.tgz": (_wrong_crc(tgz), "CRC check failed"),
        "cut-end.tgz": (tgz[:-4], "Compressed file ended before the end-of-stream marker"),
        "changed.tgz": (_changed_byte(tgz, len(tgz) // 2), ""),
        "cut.tgz": (tgz[: len(tgz) // 2], ""),
        "changed-start.tgz": (_changed_byte(tgz, 40), ""),
        "changed.tar.xz": (_changed_byte(xz_bytes, len(xz_bytes) // 2), ""),
        "changed.zip": (_changed_byte(stored, in_photo), "Bad CRC-32 for file"),
        "cut.zip": (stored[: len(stored) // 2], "the table of contents at a zip's end is "
                    "missing"),
    }


def test_a_damaged_archive_is_called_damaged_and_nothing_is_extracted(tmp_path):
    """Cut short or with one byte changed: "archive X is damaged (...)", never the layout
    hint's "cannot read", never extracted as if whole; the user's own file stays."""
    from petalflow.tasks.errors import DamagedArchive

    datasets = tmp_path / "datasets"
    for name, (data, detail) in _damaged_variants(tmp_path).items():
        archive = tmp_path / name
        archive.write_bytes(data)
        with pytest.raises(DamagedArchive) as failed:
            extract_archive(archive, datasets, source=str(archive))
        text = str(failed.value)
        assert text.startswith(f"archive {name} is damaged ("), text
        assert detail in text and text.endswith(
            "it was cut short or its bytes changed, on the way or on disk; nothing was "
            "extracted"), text
        assert archive.read_bytes() == data  # a local archive is the user's: kept
        assert [p.name for p in datasets.iterdir() if not p.name.endswith(".lock")] == []


def test_data_after_a_whole_tgz_is_ignored_as_gzip_does(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    tgz = make_tgz(src, tmp_path / "good.tgz").read_bytes()
    for name, tail in (("zeros.tgz", bytes(2000)), ("signed.tgz", b"-- signature --\n")):
        (tmp_path / name).write_bytes(tgz + tail)
        root = extract_archive(tmp_path / name, tmp_path / name.replace(".", "-"))
        assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in src.iterdir())


def test_a_damaged_download_is_removed_so_the_next_run_downloads_it_again(tmp_path):
    """Revalidated, a damaged copy would be kept while the server's validators stay the same
    (a 304 each time): it is removed with its record, and the next download fetches it."""
    from petalflow.tasks.download import SOURCE_RECORD, source_identity, source_record
    from petalflow.tasks.errors import DamagedArchive
    from tests.helpers import revalidating_server

    good = make_tgz(make_dataset(tmp_path / "src", per_class=3), tmp_path / "g.tgz").read_bytes()
    damaged = _wrong_crc(good)
    dest, datasets = tmp_path / "downloads", tmp_path / "datasets"
    with revalidating_server() as site:
        url = site.put("/photos.tgz", damaged)
        archive = download_archive(url, dest)
        with pytest.raises(DamagedArchive) as failed:
            extract_archive(archive, datasets, source=source_identity(url))
        assert str(failed.value).endswith(
            "nothing was extracted; the downloaded copy was removed, and the next run "
            "downloads it again")
        assert not archive.exists() and not (archive.parent / SOURCE_RECORD).exists()
        again = download_archive(url, dest)  # the same bytes: the server did not change
        assert site.body_bytes == 2 * len(damaged) and len(site.requests) == 2
        assert source_record(again)["outcome"] == "downloaded"
        assert not site.requests[1][1]  # nothing to revalidate: no If-None-Match
        site.put("/photos.tgz", good)  # the fixed archive behind the same URL
        fixed = download_archive(url, dest)
    root = extract_archive(fixed, datasets, source=source_identity(url))
    assert sorted(p.name for p in root.iterdir()) == sorted(COLOURS)


def test_archives_inside_the_archive_are_opened_once(tmp_path):
    """A download of a download: Kaggle's zip around the dataset's .tgz, or a zip of one zip
    per class. The inner archives are opened in place (one level), so the class folders are
    found; a tree that holds images is left as it is."""
    from petalflow.tasks.dataset import scan_dataset

    src = make_dataset(tmp_path / "src", per_class=3)
    inner = make_tgz(src, tmp_path / "inner" / "flower_photos.tgz", arcname="flower_photos")
    kaggle = tmp_path / "archive.zip"
    with zipfile.ZipFile(kaggle, "w") as zf:
        zf.write(inner, "flower_photos.tgz")
        zf.writestr("__MACOSX/._flower_photos.tgz", b"\x00\x05\x16\x07AppleDouble")
    root = extract_archive(kaggle, tmp_path / "datasets")
    assert root.name == "flower_photos"
    assert sorted(p.name for p in root.iterdir()) == ["blue", "green", "red"]
    assert not list(root.parent.glob("*.tgz"))

    per_class = tmp_path / "per-class.zip"
    with zipfile.ZipFile(per_class, "w") as zf:
        for name in ("blue", "green", "red"):
            one = make_zip(src / name, tmp_path / "one" / f"{name}.zip", arcname=name)
            zf.write(one, f"data/{name}.zip")
    manifest = scan_dataset(extract_archive(per_class, tmp_path / "datasets"))
    assert sorted(manifest["label"].unique()) == ["blue", "green", "red"]
    assert (manifest["status"] == "ok").sum() == 9

    # Images beside an archive: the archive is a file of its class, not opened.
    mixed = tmp_path / "mixed.zip"
    with zipfile.ZipFile(mixed, "w") as zf:
        zf.write(src / "red" / "000.jpg", "photos/red/000.jpg")
        zf.write(src / "green" / "000.jpg", "photos/green/000.jpg")
        zf.write(inner, "photos/red/more.tgz")
    root = extract_archive(mixed, tmp_path / "datasets")
    assert sorted(p.name for p in (root / "red").iterdir()) == ["000.jpg", "more.tgz"]
    assert not list((tmp_path / "datasets").glob(".staging-*"))


def test_an_archive_inside_the_archive_counts_toward_the_size_limit_and_must_be_one(tmp_path):
    """The inner archives' contents count toward --max-extract-size with the outer one's (a
    zip of small zip bombs is refused); an inner "archive" that is none is named; nothing is
    left in the datasets folder either way."""
    bomb = tmp_path / "inner.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photos/a/zeros.bin", b"\0" * 600_000)
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(bomb, "one.zip")
        zf.write(bomb, "two.zip")
    datasets = tmp_path / "datasets"
    with pytest.raises(ArchiveError, match="archive expands to more than 1000000 bytes"):
        extract_archive(outer, datasets, max_bytes=1_000_000)
    fake = tmp_path / "fake.zip"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("data/photos.tgz", "<!doctype html><html>sign in</html>")
    with pytest.raises(ArchiveError, match="photos.tgz is a web page"):
        extract_archive(fake, datasets)
    assert [p for p in datasets.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("url, says", [
    ("https://github.com/acme/photos/blob/main/data/photos.tgz?raw=false",
     "GitHub's page for the file; the file itself is at "
     "https://github.com/acme/photos/raw/main/data/photos.tgz"),
    ("https://huggingface.co/datasets/acme/photos/blob/main/photos.tgz",
     "Hugging Face's page for the file; the file itself is at "
     "https://huggingface.co/datasets/acme/photos/resolve/main/photos.tgz"),
    ("https://gitlab.com/acme/team/photos/-/blob/v2/photos.tgz",
     "GitLab's page for the file; the file itself is at "
     "https://gitlab.com/acme/team/photos/-/raw/v2/photos.tgz"),
    ("https://www.dropbox.com/scl/fi/abc123/photos.tgz?rlkey=k1&dl=0",
     "Dropbox's preview page; the file itself comes with dl=1 at the end of the link instead "
     "of dl=0"),
    ("https://drive.google.com/file/d/1AbC-dEf_9/view?usp=sharing",
     "Google Drive's page for the file; the file itself is at "
     "https://drive.usercontent.google.com/download?id=1AbC-dEf_9&export=download&confirm=t"),
    ("https://drive.google.com/open?id=1AbC-dEf_9",
     "Google Drive's page for the file; the file itself is at "
     "https://drive.usercontent.google.com/download?id=1AbC-dEf_9&export=download&confirm=t"),
])
def test_a_share_page_url_is_answered_with_the_url_of_the_file(tmp_path, url, says):
    """The URL a browser shows for a file on GitHub, Hugging Face, GitLab, Dropbox or Google
    Drive answers with a page about the file, not the file: the run said only "use the URL
    that downloads the archive itself". It now names that URL (or the change that makes it)."""
    from petalflow.tasks.download import describe_source
    from petalflow.tasks.errors import WebPageNotArchive

    page = tmp_path / "photos.tgz"
    page.write_bytes(b"<!DOCTYPE html><html><head><title>photos.tgz</title></head></html>")
    with pytest.raises(WebPageNotArchive) as caught:
        describe_source(url, page)
    assert str(caught.value) == (
        "photos.tgz is a web page (HTML), not an archive: the URL answered with a page (a "
        "sign-in, a download confirmation or an error page?) instead of the file; use the URL "
        f"that downloads the archive itself. This URL is {says}")


def test_the_url_of_a_served_folder_is_said_to_be_a_folder_listing(tmp_path):
    """The URL of a folder on a file server (``python -m http.server``, nginx's or Apache's
    index pages) answers with the listing of the folder, not its files: before, "a web page
    (a sign-in, a download confirmation or an error page?)". Now it says it is the listing,
    names the folders it lists and says to serve an archive of them."""
    from petalflow.tasks.download import describe_source
    from petalflow.tasks.errors import WebPageNotArchive

    folder = make_dataset(tmp_path / "served" / "photos", per_class=2)
    (folder / "LICENSE.txt").write_text("CC-BY")
    with serve_directory(tmp_path / "served") as url:
        page = download_archive(f"{url}/photos/", tmp_path / "d")
        with pytest.raises(WebPageNotArchive) as caught:
            describe_source(f"{url}/photos/", page)
    assert str(caught.value).startswith(
        "photos is a folder's listing (a web page), not an archive: the URL is that of a folder "
        "on the server (it lists 3 folders: blue/, green/, red/); petalflow downloads one "
        "archive: pack the class folders (tar -czf photos.tgz photos/) and give the archive's "
        "URL, or the folder's path where it is mounted")
    from petalflow.flows.cli import EXIT_SOURCE, explain_failure

    failed = explain_failure(caught.value)
    assert failed.code == EXIT_SOURCE and "share link" not in failed.hint
    assert "one archive of the class folders" in failed.hint
    # nginx's autoindex, Apache's mod_autoindex: "Index of /...".
    nginx = tmp_path / "nginx.html"
    nginx.write_text("<html>\r\n<head><title>Index of /data/</title></head>\r\n<body>\r\n"
                     "<h1>Index of /data/</h1><hr><pre><a href=\"../\">../</a>\r\n"
                     + "".join(f'<a href="{c}/">{c}/</a>  01-Dec-2026 10:00  -\r\n'
                               for c in ("cats", "dogs", "Crème%20brûlée"))
                     + '<a href="notes.txt">notes.txt</a>\r\n</pre><hr></body>\r\n</html>\r\n')
    with pytest.raises(WebPageNotArchive, match=r"^nginx.html is a folder's listing .* \(it "
                       r"lists 3 folders: cats/, dogs/, Crème brûlée/\)"):
        describe_source("https://files.example.org/data/", nginx)


def test_a_page_from_any_other_url_gets_no_such_suggestion(tmp_path):
    from petalflow.tasks.download import describe_source
    from petalflow.tasks.errors import WebPageNotArchive

    page = tmp_path / "photos.tgz"
    page.write_bytes(b"<html>sign in</html>")
    for url in ("https://files.example.com/blob/main/photos.tgz",
                "https://github.com/acme/photos/releases/download/v1/photos.tgz"):
        with pytest.raises(WebPageNotArchive) as caught:
            describe_source(url, page)
        assert str(caught.value).endswith("use the URL that downloads the archive itself")


def test_find_data_root_descends_wrappers(tmp_path):
    make_dataset(tmp_path / "outer" / "flower_photos", per_class=1)
    (tmp_path / "outer" / "flower_photos" / "LICENSE.txt").write_text("cc-by")
    assert find_data_root(tmp_path / "outer") == tmp_path / "outer" / "flower_photos"


def test_macos_zip_metadata_is_neither_a_wrapper_nor_a_class(tmp_path):
    """Finder's "Compress" adds __MACOSX/ with ._* resource forks beside the data folder."""
    from petalflow.tasks.dataset import scan_dataset

    src = make_dataset(tmp_path / "src", per_class=2)
    archive = make_zip(src, tmp_path / "photos.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        for name in ("red", "green"):
            zf.writestr(f"__MACOSX/photos/{name}/._000.jpg", b"\x00\x05\x16\x07AppleDouble")
        zf.writestr("photos/red/.DS_Store", b"\x00\x00\x00\x01Bud1")
    root = extract_archive(archive, tmp_path / "datasets")
    assert root.name == "photos"
    manifest = scan_dataset(root)
    assert sorted(manifest["label"].unique()) == sorted(p.name for p in src.iterdir())
    assert not manifest["path"].str.contains("__MACOSX").any()
    assert (manifest["status"] == "ok").sum() == 2 * len(list(src.iterdir()))


class _LegacyNameInfo(zipfile.ZipInfo):
    """Writes the name's cp437 bytes without the UTF-8 flag, as Info-ZIP and Windows do."""

    def _encodeFilenameFlags(self):
        return self.filename.encode("cp437"), self.flag_bits


def test_zip_names_without_the_utf8_flag_keep_their_accents(tmp_path):
    from tests.helpers import write_image

    img = tmp_path / "x.jpg"
    write_image(img, (200, 30, 30), seed=1)
    archive = tmp_path / "legacy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        utf8 = "photos/Crème brûlée/0.jpg".encode("utf-8").decode("cp437")  # UTF-8 bytes
        zf.writestr(_LegacyNameInfo(utf8), img.read_bytes())
        zf.writestr(_LegacyNameInfo("photos/café/0.jpg"), img.read_bytes())  # real cp437
    with zipfile.ZipFile(archive) as zf:
        assert not any(i.flag_bits & 0x800 for i in zf.infolist())
    root = extract_archive(archive, tmp_path / "datasets")
    assert sorted(p.name for p in root.iterdir()) == ["Crème brûlée", "café"]


def test_a_zip_from_windows_powershell_with_backslash_separators_has_its_class_folders(
        tmp_path):
    """Windows PowerShell 5's Compress-Archive writes "photos\\cats\\0.jpg" (and folder
    entries ending in "\\"): before, each photo became one file of that name at the top and
    the dataset had no class folder. A dataset extracted that way before (under the archive's
    sha256) is not used: a zip is extracted under the digest of its files."""
    import hashlib

    from petalflow.tasks.dataset import prepare_dataset
    from tests.helpers import write_image

    archive = tmp_path / "Compress-Archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for cls, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
            zf.writestr(_LegacyNameInfo(f"photos\\{cls}\\"), b"")
            for i in range(5):
                image = write_image(tmp_path / "src" / f"{cls}{i}.jpg", colour, seed=i)
                zf.writestr(_LegacyNameInfo(f"photos\\{cls}\\{i}.jpg"), image.read_bytes())
    root = extract_archive(archive, tmp_path / "datasets")
    assert root.name == "photos" and sorted(p.name for p in root.iterdir()) == ["cats", "dogs"]
    info = prepare_dataset(root, tmp_path / "prepared", 0.2, 0.2, 0)
    assert info["classes"] == ["cats", "dogs"] and info["counts"]["used"] == 10

    # What the extraction left before: the same archive's folder with the names flat.
    datasets = tmp_path / "older"
    stale = datasets / hashlib.sha256(archive.read_bytes()).hexdigest()
    stale.mkdir(parents=True)
    (stale / "photos\\cats\\0.jpg").write_bytes(b"flat")
    root = extract_archive(archive, datasets)
    assert sorted(p.name for p in root.iterdir()) == ["cats", "dogs"]
    assert stale not in root.parents


def test_tar_names_in_latin1_or_cp1252_become_their_characters(tmp_path):
    """A tar made under a Latin-1/Windows locale stores "café" as b"caf\\xe9" (not UTF-8):
    extracted as "café" (before: names with surrogates, and the scan died on an encoding
    error); UTF-8 names (GNU tar's usual) are kept as they are."""
    from petalflow.tasks.download import tar_member_name
    from petalflow.tasks.dataset import prepare_dataset
    from tests.helpers import write_image

    data = write_image(tmp_path / "x.jpg", (200, 30, 30), seed=1).read_bytes()
    archive = tmp_path / "legacy.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="cp1252") as tar:
        for i, name in enumerate(["photos/café/0.jpg", "photos/café/été 1.jpg",
                                  "photos/“quoted”/0.jpg", "photos/“quoted”/1.jpg",
                                  "photos/café/2.jpg", "photos/“quoted”/2.jpg"]):
            info = tarfile.TarInfo(name)
            payload = data + bytes([i])  # distinct files
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    root = extract_archive(archive, tmp_path / "datasets")
    assert sorted(p.name for p in root.iterdir()) == ["café", "“quoted”"]
    assert (root / "café" / "été 1.jpg").is_file()
    info = prepare_dataset(root, tmp_path / "manifest", 0.34, 0.34, 0)
    assert info["classes"] == ["café", "“quoted”"]
    assert tar_member_name("photos/Crème/0.jpg") == "photos/Crème/0.jpg"
    assert tar_member_name(b"caf\x81".decode("utf-8", "surrogateescape")) == "caf\x81"


def test_download_task_does_not_retry_checksum_mismatch(archive_dir, tmp_path, prefect_harness):
    """The Prefect task retries network errors only: a bad checksum is asked for once."""
    from prefect import flow

    from petalflow.tasks.download import download_archive_task

    hits = []


    @flow
    def fetch(url: str, sha: str):
        return download_archive_task(url, str(tmp_path / "dl"), sha)

    import http.server

    original = http.server.SimpleHTTPRequestHandler.do_GET

    def counting_get(self):
        hits.append(self.path)
        return original(self)

    http.server.SimpleHTTPRequestHandler.do_GET = counting_get
    try:
        with serve_directory(archive_dir) as url:
            state = fetch(f"{url}/data.tgz", "0" * 64, return_state=True)
    finally:
        http.server.SimpleHTTPRequestHandler.do_GET = original
    assert state.is_failed()
    assert hits == ["/data.tgz"]
    assert not list((tmp_path / "dl").rglob("*.part"))


def test_zip_absolute_path_and_symlink_are_refused(tmp_path):
    import stat as stat_mod

    absolute = tmp_path / "abs.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr("/tmp/petalflow-zip-absolute.txt", "bad")
    with pytest.raises(ArchiveError, match="absolute"):
        extract_archive(absolute, tmp_path / "d1")
    assert not Path("/tmp/petalflow-zip-absolute.txt").exists()

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("photos/a/evil")
        info.external_attr = (stat_mod.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="link"):
        extract_archive(link, tmp_path / "d2")
    assert [p for p in (tmp_path / "d2").iterdir() if not p.name.endswith(".lock")] == []


# --------------------------------------------------------------------------- backbone fetch


def test_backbone_is_fetched_over_http_once_then_served_from_the_cache(tiny_backbone, tmp_path):
    from petalflow.tasks.model import fetch_backbone
    from tests.helpers import make_hub_tarball

    served = tmp_path / "served"
    served.mkdir()
    make_hub_tarball(tiny_backbone, served / "tiny.tar.gz")
    cache = tmp_path / "tfhub"
    with serve_directory(served) as url:
        path = Path(fetch_backbone(f"{url}/tiny.tar.gz", cache))
    assert cache in path.parents and (path / "saved_model.pb").is_file()
    # The server is gone: the cached copy is used without the network.
    assert Path(fetch_backbone(f"{url}/tiny.tar.gz", cache)) == path
    assert fetch_backbone(str(tiny_backbone), cache) == str(tiny_backbone.resolve())


def test_backbone_fetch_errors_say_what_to_fix_and_only_network_trouble_is_transient(
        tmp_path):
    from petalflow.tasks.errors import BackboneError
    from petalflow.tasks.model import fetch_backbone
    from tests.helpers import free_port

    served = tmp_path / "served"
    served.mkdir()
    (served / "page.tar.gz").write_text("<html>not a model</html>")
    (tmp_path / "not_a_model").mkdir()
    cache = tmp_path / "tfhub"
    with serve_directory(served) as url:
        with pytest.raises(BackboneError, match="HTTP 404.*--backbone"):
            fetch_backbone(f"{url}/missing.tar.gz", cache)
        with pytest.raises(BackboneError, match="cannot fetch backbone"):
            fetch_backbone(f"{url}/page.tar.gz", cache)
    with pytest.raises(TransientError, match="network error fetching backbone"):
        fetch_backbone(f"http://127.0.0.1:{free_port()}/gone.tar.gz", cache)
    with pytest.raises(BackboneError, match="not a TF Hub SavedModel"):
        fetch_backbone(str(tmp_path / "not_a_model"), cache)
    assert not list(cache.glob("*/saved_model.pb"))  # nothing half-fetched is left to trust


def test_a_private_backbone_is_fetched_with_the_urls_or_the_netrc_files_credentials(
        tiny_backbone, tmp_path, monkeypatch):
    """A backbone on a private server (an organisation's own model store): TF Hub's resolver
    (urllib) reads neither a URL's user and password nor the netrc file, so a URL with them
    failed as "Name or service not known", retried as a network error four times (30 s), and
    printed the password in every message. Now the URL's credentials, else the netrc file's
    for its host, are sent to that host only (not on to where it redirects); a 401 says where
    to put them, or that those given were refused; no message holds the password."""
    from petalflow.tasks.errors import BackboneError
    from petalflow.tasks.model import fetch_backbone
    from tests.helpers import base_url, make_hub_tarball, private_server

    tarball = make_hub_tarball(tiny_backbone, tmp_path / "tiny.tar.gz").read_bytes()
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))  # no file there yet
    caches = (tmp_path / f"tfhub{i}" for i in range(10))  # a fetched model is cached: a new one
    with private_server({"/private/tiny.tar.gz": tarball, "/tiny.tar.gz": tarball},
                        "bob", "pa ss:w0rd") as private, \
            private_server({"/tiny.tar.gz": tarball}, "-", "-") as store:
        host = base_url(private).split("://")[1]
        url = f"{base_url(private)}/private/tiny.tar.gz"
        with pytest.raises(BackboneError) as refused:
            fetch_backbone(url, tmp_path / "refused")
        assert not list((tmp_path / "refused").glob("*/saved_model.pb"))  # nothing cached
        assert str(refused.value) == (
            f"HTTP 401 fetching backbone {url}; check --backbone; if the backbone needs "
            "credentials, give them for 127.0.0.1 in the netrc file of the machine that "
            "downloads (~/.netrc, or the file $NETRC names: `machine 127.0.0.1 login USER "
            "password TOKEN`), which keeps them out of the URL and the run's parameters")
        # The URL's own (a password with a space and a colon, percent-encoded in the URL).
        with pytest.raises(BackboneError) as wrong:
            fetch_backbone(f"http://bob:WRONG@{host}/private/tiny.tar.gz", next(caches))
        assert str(wrong.value) == (
            f"HTTP 401 fetching backbone http://***@{host}/private/tiny.tar.gz; check "
            "--backbone; the server refused the credentials in the URL")
        fetched = Path(fetch_backbone(f"http://bob:pa%20ss%3Aw0rd@{host}/private/tiny.tar.gz",
                                      next(caches)))
        assert (fetched / "saved_model.pb").is_file()
        netrc.write_text("machine 127.0.0.1 login bob password WRONG\n")
        with pytest.raises(BackboneError, match=(
                f"check --backbone; the server refused the credentials for 127.0.0.1 in "
                f"{netrc}$")):
            fetch_backbone(url, next(caches))
        netrc.write_text('machine 127.0.0.1 login bob password "pa ss:w0rd"\n')
        assert (Path(fetch_backbone(url, next(caches))) / "saved_model.pb").is_file()
        # Redirected to another host (an object store's signed URL): not sent on there.
        private.redirects["/private/moved.tar.gz"] = f"{base_url(store)}/tiny.tar.gz"
        private.seen.clear()
        moved = fetch_backbone(f"{base_url(private)}/private/moved.tar.gz", next(caches))
        assert (Path(moved) / "saved_model.pb").is_file()
        assert private.seen[0][1] and store.seen == [(store.seen[0][0], None)], store.seen
        netrc.write_text("machine\n")
        with pytest.raises(BackboneError, match=f"cannot read the netrc file {netrc}"):
            fetch_backbone(url, next(caches))
    assert "w0rd" not in str(refused.value) + str(wrong.value)


def test_a_server_whose_certificate_is_not_trusted_fails_at_once_saying_how_to_trust_it(
        tiny_backbone, tmp_path, monkeypatch):
    """A data or backbone server inside an organisation presents a certificate of the
    organisation's own authority, which Python does not trust: the download was retried as a
    network error four times (30 s) and ended with "offline, or behind a proxy?". Now it fails
    at once, naming the host and the reason, and saying how to trust the authority
    (SSL_CERT_FILE); with it set, both download."""
    from petalflow.flows.cli import EXIT_BACKBONE, EXIT_SOURCE, explain_failure
    from petalflow.tasks.errors import BackboneError, DownloadError
    from petalflow.tasks.model import fetch_backbone
    from tests.helpers import make_hub_tarball, self_signed_certificate

    served = tmp_path / "served"
    make_tgz(make_dataset(tmp_path / "photos", per_class=2), served / "photos.tgz")
    make_hub_tarball(tiny_backbone, served / "tiny.tar.gz")
    cert, key = self_signed_certificate(tmp_path / "tls")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with serve_directory(served, tls=(cert, key)) as url:
        host = url.split("//")[1]
        with pytest.raises(DownloadError) as data:
            download_archive(f"{url}/photos.tgz", tmp_path / "d")
        assert not isinstance(data.value, TransientError)
        assert str(data.value).startswith(
            f"the certificate of {host} is not trusted (self-signed certificate): ")
        assert "set SSL_CERT_FILE to the authority's certificate" in str(data.value)
        assert explain_failure(data.value).code == EXIT_SOURCE
        with pytest.raises(BackboneError) as hub:
            fetch_backbone(f"{url}/tiny.tar.gz", tmp_path / "tfhub")
        assert str(hub.value).startswith(
            f"the certificate of {host} is not trusted (self-signed certificate): ")
        assert explain_failure(hub.value).code == EXIT_BACKBONE
        assert not list((tmp_path / "d").rglob("*.part"))

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as the README says
        got = download_archive(f"{url}/photos.tgz", tmp_path / "d")
        assert got.read_bytes() == (served / "photos.tgz").read_bytes()
        # TF Hub makes its TLS context as it is imported: a process started with it set.
        fetched = subprocess.run(
            [sys.executable, "-c", "import sys; from petalflow.tasks.model import "
             "fetch_backbone; print(fetch_backbone(sys.argv[1], sys.argv[2]))",
             f"{url}/tiny.tar.gz", str(tmp_path / "tfhub")],
            capture_output=True, text=True, timeout=300)
        assert fetched.returncode == 0, fetched.stderr[-2000:]
        assert (Path(fetched.stdout.strip().splitlines()[-1]) / "saved_model.pb").is_file()


def test_an_https_url_of_a_plain_http_server_fails_at_once_giving_its_http_url(
        tiny_backbone, tmp_path):
    """An internal file server that speaks plain HTTP, written https:// (browsers add it, and
    habit): OpenSSL's "wrong version number" was retried as a network error for 38 s and
    ended "offline, or behind a proxy?". Now at once, saying the server did not answer in TLS
    and giving the http:// URL (its secrets hidden), for the data and the backbone."""
    from petalflow.flows.cli import EXIT_BACKBONE, EXIT_SOURCE, explain_failure
    from petalflow.tasks.errors import BackboneError, DownloadError
    from petalflow.tasks.model import fetch_backbone
    from tests.helpers import make_hub_tarball

    served = tmp_path / "served"
    make_tgz(make_dataset(tmp_path / "photos", per_class=2), served / "photos.tgz")
    make_hub_tarball(tiny_backbone, served / "tiny.tar.gz")
    with serve_directory(served) as url:
        host = url.split("//")[1]
        https = f"https://{host}"
        with pytest.raises(DownloadError) as data:
            download_archive(f"{https}/photos.tgz?token=s3cret", tmp_path / "d")
        assert not isinstance(data.value, TransientError)
        assert str(data.value) == (
            f"the server at {host} did not answer in TLS (WRONG_VERSION_NUMBER: an https:// URL "
            "of a server that speaks plain HTTP, or a port that is not the web server's): a "
            f"plain-HTTP server's URL begins http://, http://{host}/photos.tgz?token=***")
        assert explain_failure(data.value).code == EXIT_SOURCE
        with pytest.raises(BackboneError) as hub:
            fetch_backbone(f"{https}/tiny.tar.gz", tmp_path / "tfhub")
        assert str(hub.value).startswith(f"the server at {host} did not answer in TLS (")
        assert f"http://{host}/tiny.tar.gz (backbone {https}/tiny.tar.gz)" in str(hub.value)
        assert explain_failure(hub.value).code == EXIT_BACKBONE
        assert not list((tmp_path / "d").rglob("*.part"))
        assert download_archive(f"{url}/photos.tgz", tmp_path / "d").read_bytes() == (
            served / "photos.tgz").read_bytes()


# --------------------------------------------------------------------------- change detection


def _two_archives(tmp_path: Path) -> tuple[bytes, bytes]:
    old = make_tgz(make_dataset(tmp_path / "old", per_class=3), tmp_path / "old.tgz")
    new = make_tgz(make_dataset(tmp_path / "new", per_class=2, seed=9), tmp_path / "new.tgz")
    return old.read_bytes(), new.read_bytes()


def test_unchanged_source_is_revalidated_without_a_body(tmp_path):
    from petalflow.tasks.download import source_record
    from tests.helpers import revalidating_server

    old, _new = _two_archives(tmp_path)
    dest = tmp_path / "downloads"
    with revalidating_server() as site:
        url = site.put("/data.tgz", old)
        first = download_archive(url, dest)
        assert site.body_bytes == len(old) and source_record(first)["outcome"] == "downloaded"
        mtime = first.stat().st_mtime_ns
        again = download_archive(url, dest)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert site.body_bytes == len(old)  # the second request got a 304, no body
    assert len(site.requests) == 2 and site.requests[1][1]  # it sent If-None-Match
    record = source_record(again)
    assert record["outcome"] == "not modified" and record["sha256"] == hashlib.sha256(
        old).hexdigest()
    assert record["etag"] and record["last_modified"]


def test_changed_source_is_downloaded_beside_the_old_copy_and_switched(tmp_path, monkeypatch):
    import petalflow.tasks.download as download
    from petalflow.tasks.download import source_record
    from tests.helpers import revalidating_server

    old, new = _two_archives(tmp_path)
    dest = tmp_path / "downloads"
    with revalidating_server() as site:
        url = site.put("/data.tgz", old)
        first = download_archive(url, dest)
        site.put("/data.tgz", new)
        # While the new bytes arrive, the old copy is still there and intact.
        seen = []
        real_replace = download.os.replace

        def watching_replace(src, dst):
            if Path(dst) == first:
                seen.append(hashlib.sha256(Path(dst).read_bytes()).hexdigest())
            return real_replace(src, dst)

        monkeypatch.setattr(download.os, "replace", watching_replace)
        got = download_archive(url, dest)
    assert got == first  # same place: a later run finds the newest verified copy
    assert seen == [hashlib.sha256(old).hexdigest()]
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(new).hexdigest()
    assert source_record(got)["outcome"] == "downloaded"
    assert not list(dest.rglob("*.part"))


def test_an_archive_replaced_by_an_older_file_is_downloaded(tmp_path):
    """Python's own file server (what `python -m http.server` runs), which dates a file by its
    mtime and answers If-Modified-Since with "not newer": an archive replaced by an older
    file of the same size (`mv`, `cp -p`, `ln -sf` to an earlier export) got 304 and was never
    downloaded. Its date is now compared for equality through HEAD; an unchanged archive
    still costs no body."""
    import http.server

    from petalflow.tasks.download import source_record
    from tests.helpers import base_url, serve_handler

    served, exports = tmp_path / "served", tmp_path / "exports"
    served.mkdir()
    exports.mkdir()
    requests = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_response(self, code, message=None):
            requests.append((self.command, code))
            super().send_response(code, message)

    day = 24 * 3600
    (served / "data.tgz").write_bytes(b"first export " * 100)
    for i, name in enumerate(["second.tgz", "third.tgz"]):  # made earlier, each 1300 bytes
        (exports / name).write_bytes(f"{name:<13}".encode() * 100)
        os.utime(exports / name, (time.time() - (3 - i) * day,) * 2)
    dest = tmp_path / "downloads"
    handler = lambda *a, **kw: Counting(*a, directory=str(served), **kw)  # noqa: E731
    with serve_handler(handler) as server:
        url = f"{base_url(server)}/data.tgz"
        first = download_archive(url, dest)
        assert download_archive(url, dest) == first
        assert source_record(first)["outcome"] == "not modified"
        assert requests == [("GET", 200), ("HEAD", 200)]  # no second body

        os.replace(exports / "second.tgz", served / "data.tgz")  # mv: keeps its older date
        assert download_archive(url, dest).read_bytes() == b"second.tgz   " * 100
        assert source_record(first)["outcome"] == "downloaded"

        (served / "data.tgz").unlink()
        (served / "data.tgz").symlink_to(exports / "third.tgz")  # ln -sf: the link's target
        assert download_archive(url, dest).read_bytes() == b"third.tgz    " * 100
        assert requests[2:] == [("HEAD", 200), ("GET", 200), ("HEAD", 200), ("GET", 200)]


def test_a_dated_source_that_refuses_head_is_revalidated_with_its_date(tmp_path):
    """A source with Last-Modified and no ETag whose server answers GET only (a presigned GET
    URL refuses HEAD): the GET carries If-Modified-Since as before, and a 304 costs no body."""
    from petalflow.tasks.download import source_record
    from tests.helpers import revalidating_server

    old, new = _two_archives(tmp_path)
    dest = tmp_path / "downloads"
    with revalidating_server(etag=False) as site:
        url = site.put("/data.tgz", old)
        first = download_archive(url, dest)
        assert source_record(first)["etag"] is None and source_record(first)["last_modified"]
        assert download_archive(url, dest) == first
        assert source_record(first)["outcome"] == "not modified"
        assert site.body_bytes == len(old) and site.requests[-1][2]  # If-Modified-Since, 304
        site.put("/data.tgz", new)
        assert download_archive(url, dest).read_bytes() == new


def test_server_without_validators_is_downloaded_and_compared_by_hash(tmp_path):
    from petalflow.tasks.download import source_record
    from tests.helpers import revalidating_server

    old, new = _two_archives(tmp_path)
    dest = tmp_path / "downloads"
    with revalidating_server(validators=False) as site:
        url = site.put("/data.tgz", old)
        download_archive(url, dest)
        same = download_archive(url, dest)
        assert source_record(same)["outcome"] == "unchanged bytes"
        assert site.conditional == 0  # nothing to revalidate with
        site.put("/data.tgz", new)
        changed = download_archive(url, dest)
    assert source_record(changed)["outcome"] == "downloaded"
    assert changed.read_bytes() == new


def test_a_url_that_redirects_is_revalidated_where_it_leads_and_records_it(tmp_path):
    """A "latest" link (a release page's asset, a download service) answers 302 to the file
    of the day: the copy is revalidated through the redirect (304, no body), a redirect to
    another file downloads it, and the record says where the URL led."""
    from petalflow.tasks.download import source_record
    from tests.helpers import revalidating_server

    old, new = _two_archives(tmp_path)
    dest = tmp_path / "downloads"
    with revalidating_server() as site:
        first_file = site.put("/2026-11-28.tgz", old)
        site.redirects["/latest.tgz"] = "/2026-11-28.tgz"
        url = site.url + "/latest.tgz"
        got = download_archive(url, dest)
        assert got.name == "latest.tgz" and got.read_bytes() == old
        assert source_record(got)["redirected_to"] == first_file
        assert download_archive(url, dest) == got
        assert source_record(got)["outcome"] == "not modified" and site.body_bytes == len(old)
        next_file = site.put("/2026-12-05.tgz", new)
        site.redirects["/latest.tgz"] = "/2026-12-05.tgz"
        assert download_archive(url, dest).read_bytes() == new
        record = source_record(got)
        assert record["outcome"] == "downloaded" and record["redirected_to"] == next_file
        assert record["url"] == url
        # The run's provenance (the MLflow tags, the model card) says which file it was.
        from petalflow.tasks.download import describe_source
        from petalflow.tasks.registry import source_tags
        from petalflow.tasks.report import _source_lines

        source = describe_source(url, got)
        assert source["redirected_to"] == next_file
        assert source_tags(source)["source_redirected_to"] == next_file
        assert f"- The URL redirected to `{next_file}`" in _source_lines(source)
        # A URL that leads nowhere else records no redirect.
        direct = download_archive(next_file, tmp_path / "direct")
        assert "redirected_to" not in source_record(direct)
        assert "source_redirected_to" not in source_tags(describe_source(next_file, direct))


def test_a_redirect_that_cannot_lead_to_the_archive_fails_at_once_saying_where_it_led(tmp_path):
    """A redirect loop (a sign-in that wants a browser's cookies), a redirect to a protocol
    petalflow does not download, and an error status where the redirect led: each a
    DownloadError (no retry) naming the URL given and where it led, its secrets hidden; a
    sign-in page the URL redirected to says where. Before: httpx's bare "Exceeded maximum
    allowed redirects." without any URL, and the ftp redirect a "network error" retried as if
    the network were down."""
    from petalflow.tasks.download import describe_source
    from petalflow.tasks.errors import DownloadError, TransientError, WebPageNotArchive
    from tests.helpers import revalidating_server

    dest = tmp_path / "downloads"
    with revalidating_server() as site:
        site.redirects["/data.tgz"] = "/sso/login?next=/data.tgz"
        site.redirects["/sso/login?next=/data.tgz"] = "/data.tgz"
        with pytest.raises(DownloadError) as loop:
            download_archive(site.url + "/data.tgz", dest)
        assert not isinstance(loop.value, TransientError)
        text = str(loop.value)
        assert f"{site.url}/data.tgz redirects in a loop" in text
        assert "/sso/login?next=/data.tgz" in text and "URL of the archive itself" in text

        site.redirects["/ftp.tgz"] = "ftp://files.example.org/pub/data.tgz"
        with pytest.raises(DownloadError, match=r"/ftp.tgz redirects to "
                           r"ftp://files.example.org/pub/data.tgz, which petalflow cannot "
                           r"download \(http and https only\)"):
            download_archive(site.url + "/ftp.tgz", dest)

        signed = "/bucket/data.tgz?X-Amz-Expires=60&X-Amz-Signature=abc123"
        site.redirects["/release/data.tgz"] = signed
        with pytest.raises(DownloadError) as gone:
            download_archive(site.url + "/release/data.tgz", dest)
        text = str(gone.value)
        assert text.startswith(f"HTTP 404 from {site.url}/release/data.tgz (redirected to "
                               f"{site.url}/bucket/data.tgz?X-Amz-Expires=60&"
                               "X-Amz-Signature=***)")
        assert "abc123" not in text

        # A redirect to a sign-in page that answers 200: the page is refused as before, and
        # the error says where the URL led (the sign-in's address tells whose it is).
        site.put("/sso/login", b"<!DOCTYPE html><html><body>Sign in</body></html>")
        site.redirects["/private.tgz"] = "/sso/login"
        page = download_archive(site.url + "/private.tgz", dest)
        with pytest.raises(WebPageNotArchive) as signin:
            describe_source(site.url + "/private.tgz", page)
        assert str(signin.value).endswith(
            "use the URL that downloads the archive itself. The URL redirected to "
            f"{site.url}/sso/login")
    assert not list(dest.rglob("*.part"))


def test_pinned_digest_means_exactly_these_bytes(tmp_path):
    from tests.helpers import revalidating_server

    old, new = _two_archives(tmp_path)
    pin = hashlib.sha256(old).hexdigest()
    dest = tmp_path / "downloads"
    with revalidating_server() as site:
        url = site.put("/data.tgz", old)
        got = download_archive(url, dest, pin)
        site.put("/data.tgz", new)
        # The pinned copy on disk is reused without asking the server...
        assert download_archive(url, dest, pin) == got and len(site.requests) == 1
        # ...and new bytes behind the URL are refused when they are asked for.
        with pytest.raises(ChecksumMismatch, match="dataset sha256"):
            download_archive(url, tmp_path / "elsewhere", pin)
    assert got.read_bytes() == old


def test_folder_listing_fingerprint_changes_with_the_folder(tmp_path):
    from petalflow.tasks.download import describe_source

    src = make_dataset(tmp_path / "src", per_class=2)
    before = describe_source(str(src), src)
    assert before["kind"] == "folder" and before["sha256"] is None
    assert describe_source(str(src), src) == before
    # What the scan never reads is no change of the data: a Mac's .DS_Store rewritten as a
    # person browses a shared folder, the thumbnails a NAS makes beside each photo. Each
    # announced a change (and started a training that had nothing to do).
    (src / ".DS_Store").write_bytes(b"Bud1" + bytes(60))
    (src / "red" / "._000.jpg").write_bytes(b"\0\5\26\7")
    write_image(src / "red" / "@eaDir" / "000.jpg" / "SYNOPHOTO_THUMB_M.jpg", (1, 2, 3))
    write_image(src / "#recycle" / "red" / "old.jpg", (1, 2, 3))
    # Nor the files kept beside the photos: an editor rewrites a photo's .xmp sidecar when it
    # is rated, Windows its Thumbs.db when the folder is opened, a phone syncs .AAE records.
    (src / "red" / "000.xmp").write_text("<x:xmpmeta rating='5'/>")
    (src / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
    (src / "green" / "000.jpg.json").write_text('{"title": "000.jpg"}')
    (src / "green" / "IMG_0001.AAE").write_text("<plist/>")
    assert describe_source(str(src), src)["listing_fingerprint"] == before[
        "listing_fingerprint"]
    (src / "red" / "extra.jpg").write_bytes((src / "red" / "000.jpg").read_bytes())
    assert describe_source(str(src), src)["listing_fingerprint"] != before[
        "listing_fingerprint"]


def test_a_changed_folder_is_announced_once_nothing_in_it_changed_for_a_while(tmp_path):
    """The listing's last change is the latest ctime of its files and folders (a copy sets
    it; ``cp -p`` keeps the mtime); the watch waits until it is ``QUIET_S`` old."""
    import os
    import time

    from petalflow.tasks.download import describe_source
    from petalflow.tasks.watch import QUIET_S, still_changing

    src = make_dataset(tmp_path / "src", per_class=2)
    old = time.time() - 3600
    write_image(src / "red" / "copied.jpg", COLOURS["red"], seed=3)
    os.utime(src / "red" / "copied.jpg", (old, old))  # as `cp -p` leaves it
    now = time.time()
    source = describe_source(str(src), src)
    assert now - 5 < source["last_change"] <= time.time()
    assert still_changing(source, now + 2) == (
        "something in the folder changed 2 s ago (a copy still in progress?): it is announced "
        f"once nothing in it has changed for {QUIET_S:.0f} s, at a later check")
    assert still_changing(source, source["last_change"] + QUIET_S) is None
    # A file server's clock far ahead of this one says nothing about quiet; an archive's
    # extraction, not its time, tells whether it is whole.
    assert still_changing(source, source["last_change"] - QUIET_S - 1) is None
    assert still_changing({"kind": "http", "last_change": now}, now) is None


def test_watch_runs_that_overlap_announce_a_change_once(tmp_path):
    """A schedule's watch runs overlap when a check takes longer than the interval (the
    worker runs several at once): both found the change not announced yet, and both emitted
    it, starting two trainings on the same data. The announcement is made under a lock per
    source: the later run finds it announced and says when."""
    import threading

    from petalflow.tasks.watch import already_announced, announce_once

    watch_dir = tmp_path / "watch"
    source = {"kind": "http", "url": "http://example.org/photos.tgz", "sha256": "a" * 64}
    assert already_announced(watch_dir, source) is None  # what both runs' checks found
    emitted, results, both_in = [], [], threading.Barrier(2)

    def emit():
        emitted.append(threading.current_thread().name)
        time.sleep(0.5)  # the event's round trip to the server
        return f"event-{len(emitted)}"

    def watch_run():
        both_in.wait()
        results.append(announce_once(watch_dir, source, emit))

    runs = [threading.Thread(target=watch_run, name=f"run-{i}") for i in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(emitted) == 1, emitted
    announced = already_announced(watch_dir, source)
    assert sorted(results, key=str) == sorted([("event-1", None), (None, announced)], key=str)
    # Other bytes behind the URL are a new state: announced again.
    assert announce_once(watch_dir, {**source, "sha256": "b" * 64}, emit) == ("event-2", None)
    assert len(list(watch_dir.glob("*.json"))) == 1  # one record per source


def test_wrong_image_size_is_refused_naming_both(tiny_backbone, any_size_backbone, tmp_path):
    from petalflow.tasks.download import fetch_backbone_task
    from petalflow.tasks.errors import BackboneError
    from petalflow.tasks.model import declared_input_size

    assert declared_input_size(tiny_backbone) == 32
    assert declared_input_size(any_size_backbone) is None
    with pytest.raises(BackboneError, match=r"takes 32x32 images but --image-size is 224"):
        fetch_backbone_task.fn(str(tiny_backbone), str(tmp_path), 224)
    assert fetch_backbone_task.fn(str(tiny_backbone), str(tmp_path), 32) == str(
        Path(tiny_backbone).resolve())
    assert fetch_backbone_task.fn(str(any_size_backbone), str(tmp_path), 224)


def test_a_classification_backbone_is_said_to_be_one(tiny_backbone, tmp_path, caplog):
    """A TF Hub *classification* handle where a feature vector belongs (the two differ in one
    word of the URL) was trained on without a word: the head learnt the new classes from
    ImageNet's 1001 class scores instead of the image features before them. The fetch now
    warns, naming what to give instead; a feature vector gets no warning."""
    from petalflow.tasks.download import fetch_backbone_task
    from tests.helpers import export_tiny_backbone

    classifier = export_tiny_backbone(tmp_path / "classification", outputs=1001)
    with caplog.at_level("WARNING", logger="petalflow"):
        fetch_backbone_task.fn(str(tiny_backbone), str(tmp_path / "cache"), 32)
        assert caplog.records == []
        fetch_backbone_task.fn(str(classifier), str(tmp_path / "cache"), 32)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
        "WARNING", f"backbone {classifier} outputs 1001 values per image, as ImageNet "
        "classification models do (one score per ImageNet class): the head would learn your "
        "classes from those scores instead of the image features before them. If this is a "
        "classification model, give the same network's feature-vector model (on TF Hub and "
        "Kaggle its handle says feature_vector where this one says classification)")]


def _zip_with_header_fields(folder: Path, archive: Path, flag_bits: int = 0,
                            method: Optional[int] = None) -> Path:
    """``make_zip``'s zip (stored) with every member's general-purpose flags or compression
    method set in its local and central headers: what an encrypted zip, or Windows Explorer's
    Deflate64 for large files, says there (neither can be written with zipfile)."""
    import struct

    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"photos/{path.relative_to(folder).as_posix()}")
    data = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at != -1:
            flags, kind = struct.unpack_from("<HH", data, at + flags_at)
            struct.pack_into("<HH", data, at + flags_at, flags | flag_bits,
                             kind if method is None else method)
            at = data.find(signature, at + 4)
    archive.write_bytes(bytes(data))
    return archive


def test_a_password_protected_or_deflate64_zip_is_refused_saying_what_to_do(tmp_path):
    """An encrypted zip failed with Python's "File <ZipInfo filename='photos/blue/000.jpg'
    compress_type=deflate ...> is encrypted, password required for extraction" (a generic
    error, exit 1) after the files before it were written; Deflate64 (Windows Explorer, large
    files) with "That compression method is not supported". Both are refused before anything
    is extracted, saying what the archive is and what to give instead."""
    src = make_dataset(tmp_path / "src", per_class=3)
    cases = [
        ({"flag_bits": 0x1}, "locked.zip is password-protected (9 of its 9 files are encrypted, "
         "e.g. 'photos/blue/000.jpg'): petalflow takes no password; extract it yourself and "
         "give the folder as the data URL, or pack the class folders again without a "
         "password"),
        ({"method": 9}, "wide.zip uses a compression Python's zip reader does not read "
         "(Deflate64, method 9; 9 files, e.g. 'photos/blue/000.jpg'; Windows Explorer writes it "
         "for large files): pack the class folders again as .tar.gz, or as .zip with Deflate "
         "(zip -r, or 7-Zip with the Deflate method)"),
    ]
    for fields, message in cases:
        name = message.split(" ", 1)[0]
        target = tmp_path / name.replace(".", "_")
        archive = _zip_with_header_fields(src, tmp_path / name, **fields)
        with pytest.raises(ArchiveError) as refused:
            extract_archive(archive, target)
        assert str(refused.value) == message
        assert [p for p in target.iterdir() if not p.name.endswith(".lock")] == []


def test_urls_in_an_error_message_are_recorded_without_their_secrets():
    from petalflow.tasks.common import redact_urls_in

    text = ("HTTP 403 from https://ann:s3cret@data.example.com/photos.tgz?X-Amz-Signature=abc&"
            "v=2 ('https://host/x?token=t1'); see http://docs.example.com/help.")
    assert redact_urls_in(text) == (
        "HTTP 403 from https://***@data.example.com/photos.tgz?X-Amz-Signature=***&v=2 "
        "('https://host/x?token=***'); see http://docs.example.com/help.")


class _RateLimited:
    """A server that answers the first ``refusals`` requests with ``code`` and Retry-After
    ``wait`` (and an API's JSON reason, as GitHub and Hugging Face send), then serves
    ``data``; ``asked``: the time of each request."""

    def __init__(self, data: bytes, code: int, wait: str, refusals: int = 1):
        import http.server

        self.asked: list[float] = []
        limiter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):  # noqa: N802 - http.server API
                self.send_response(405)
                self.end_headers()

            def do_GET(self):  # noqa: N802
                limiter.asked.append(time.monotonic())
                if len(limiter.asked) <= refusals:
                    body = b'{"message": "API rate limit exceeded for 127.0.0.1"}'
                    self.send_response(code)
                    self.send_header("Retry-After", wait)
                    self.send_header("Content-Type", "application/json")
                else:
                    body = data
                    self.send_response(200)
                    self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.handler = Handler


def test_retry_after_is_read_in_seconds_or_as_a_date():
    from email.utils import formatdate

    from petalflow.tasks.common import retry_after_s

    now = time.time()
    assert retry_after_s("120") == 120.0
    assert retry_after_s(formatdate(now + 3600, usegmt=True), now) == pytest.approx(3600, abs=1)
    assert retry_after_s(formatdate(now - 60, usegmt=True), now) == 0.0  # already past
    assert retry_after_s(None) is None and retry_after_s("soon") is None


def test_waits_and_sizes_are_written_one_way_in_every_message():
    """One wording for a wait or limit (Retry-After, a training's time limit, a worker's grace)
    and for a size (extraction limits, a full disk)."""
    from petalflow.tasks.common import human_bytes, short_size, wait_words
    from petalflow.tasks.handoff import hours_said

    assert [wait_words(s) for s in (1, 45.4, 119, 120, 600, 7200, 3 * 86400)] == [
        "1 s", "45 s", "119 s", "2 minutes", "10 minutes", "2 hours", "3 days"]
    assert [hours_said(h) for h in (24, 1, 0.5, 1 / 3600)] == [
        "24 hours", "1 hour", "0.5 hours = 30 minutes", "0.000277778 hours = 1 s"]
    assert [human_bytes(n) for n in (0, 1023, 1000000, 20 * 1024**3)] == [
        "0 bytes", "1023 bytes", "1000000 bytes (976.6 KiB)", "21474836480 bytes (20.0 GiB)"]
    assert short_size(5 * 1024**4) == "5.0 TiB"


def test_a_server_that_asks_to_wait_is_asked_again_when_it_said(tmp_path, prefect_harness,
                                                                 caplog):
    """A rate-limited data server (429 with Retry-After: 3) was asked again after Prefect's
    own 2, 4, 8 and 16 s, all inside the limit: five refusals in 30 s, then the run failed
    "HTTP 429 from URL" with the hint to check for a proxy. The run now waits what the server
    asked before the task's retry, and says why, in the server's words."""
    from prefect import flow

    from petalflow.tasks.download import download_archive_task
    from tests.helpers import base_url, serve_handler

    data = make_tgz(make_dataset(tmp_path / "src", per_class=3), tmp_path / "p.tgz").read_bytes()
    server = _RateLimited(data, 429, "3")

    @flow
    def fetch(url: str):
        return download_archive_task(url, str(tmp_path / "dl"))

    with serve_handler(server.handler) as http:
        got = fetch(f"{base_url(http)}/photos.tgz")
    assert Path(got).read_bytes() == data
    assert len(server.asked) == 2 and server.asked[1] - server.asked[0] >= 3
    said = [r.getMessage() for r in caplog.records if "Retry-After" in r.getMessage()]
    assert said and "HTTP 429 (Too Many Requests)" in said[0]
    assert "API rate limit exceeded for 127.0.0.1" in said[0] and "3 s" in said[0]


def test_a_server_that_asks_to_wait_longer_than_a_run_ends_it_saying_when(tmp_path,
                                                                           prefect_harness):
    """Retry-After beyond what a run waits (here a date two hours on, as a maintenance page
    sends it): the run ends at the first answer, saying when to try again; nothing is
    retried, nothing half-written is left, the command exits 3 with a hint that the server
    is up (not "offline, or behind a proxy?")."""
    from email.utils import formatdate

    from prefect import flow

    from petalflow.flows.cli import EXIT_SOURCE, explain_failure
    from petalflow.tasks.download import download_archive_task
    from petalflow.tasks.errors import ServerBusy
    from tests.helpers import base_url, serve_handler

    data = make_tgz(make_dataset(tmp_path / "src", per_class=3), tmp_path / "p.tgz").read_bytes()
    server = _RateLimited(data, 503, formatdate(time.time() + 7200, usegmt=True))

    @flow
    def fetch(url: str):
        return download_archive_task(url, str(tmp_path / "dl"))

    with serve_handler(server.handler) as http:
        state = fetch(f"{base_url(http)}/photos.tgz", return_state=True)
    assert state.is_failed() and len(server.asked) == 1
    with pytest.raises(ServerBusy) as busy:
        state.result()
    text = str(busy.value)
    assert text.startswith("HTTP 503 (Service Unavailable) from http://127.0.0.1:")
    assert "API rate limit exceeded" in text and "in 2 hours (Retry-After), after " in text
    assert not [p for p in (tmp_path / "dl").rglob("*") if p.is_file()
                and not p.name.startswith(".")]
    failed = explain_failure(busy.value)
    assert failed.code == EXIT_SOURCE and "the server is up but refused for now" in failed.hint


def test_a_backbone_server_that_asks_to_wait_too_long_is_said_as_such(tmp_path):
    """TF Hub's and Kaggle's model servers rate-limit too: the backbone's fetch reads
    Retry-After the same way, and the command exits with the backbone's status."""
    from petalflow.flows.cli import EXIT_BACKBONE, explain_failure
    from petalflow.tasks.errors import ServerBusy
    from petalflow.tasks.model import fetch_backbone
    from tests.helpers import base_url, serve_handler

    server = _RateLimited(b"", 429, "86400")
    with serve_handler(server.handler) as http:
        with pytest.raises(ServerBusy, match=r"HTTP 429 \(Too Many Requests\) fetching "
                           r"backbone .* in 24 hours \(Retry-After\)") as busy:
            fetch_backbone(f"{base_url(http)}/tiny.tar.gz", tmp_path / "tfhub")
    assert explain_failure(busy.value).code == EXIT_BACKBONE


def test_names_longer_than_a_file_name_can_be_are_shortened_to_fit(tmp_path, caplog):
    """A zip or tar made on Windows or macOS, where a name takes 255 characters (a photo named
    in Japanese: 93 characters, 279 bytes of UTF-8), failed the training: "cannot extract
    archive photos.zip: [Errno 36] File name too long", with the hint to check the layout.
    Such names are shortened to fit (their beginning, a digest of the whole, the extension),
    distinct when they begin alike, and said once; a class folder's too."""
    from petalflow.tasks.download import NAME_MAX, _archive_name, fitting_name

    long = "春の庭で撮影した白いデイジーの花と青い空と緑の葉っぱの写真です" * 3
    assert len(long.encode()) > NAME_MAX
    jpeg = write_image(tmp_path / "one.jpg", (200, 200, 40)).read_bytes()
    names = [f"photos/daisy/{long}{i}.jpg" for i in range(2)] + [
        "photos/roses/1.jpg", "photos/roses/2.jpg", f"photos/{'tulpe' * 60}/1.jpg",
        f"photos/{'tulpe' * 60}/2.jpg"]
    zipped = tmp_path / "photos.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name in names:
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), jpeg)
    tarred = tmp_path / "photos.tgz"
    with tarfile.open(tarred, "w:gz") as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            tf.addfile(info, io.BytesIO(jpeg))
    for archive in (zipped, tarred):
        caplog.clear()
        root = extract_archive(archive, tmp_path / f"ds-{archive.suffix}")
        files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
        assert len(files) == len(names)
        assert all(len(part.encode()) <= NAME_MAX for f in files for part in f.parts)
        daisies = [f.name for f in files if f.parts[0] == "daisy"]
        assert len(set(daisies)) == 2 and all(d.endswith(".jpg") for d in daisies)
        assert daisies[0].startswith(long[:40])
        [tulip] = {f.parts[0] for f in files} - {"daisy", "roses"}
        assert tulip == fitting_name("tulpe" * 60) and tulip.startswith("tulpe")
        said = [r.getMessage() for r in caplog.records if "shortened to fit" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(
            f"{archive.name}: 4 names longer than a file name can be here (255 bytes)")
        assert "a class named by such a folder is named by its shortened name" in said[0]
    # A download whose URL ends in such a name: its copy and its .part fit too.
    name = _archive_name(f"https://example.org/{'x' * 300}.tgz")
    assert name.endswith(".tgz") and len((name + ".part.json").encode()) <= NAME_MAX

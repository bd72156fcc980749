"""Scan, quarantine and split on tiny folders written by the tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petalflow.tasks.dataset import (
    dataset_counts, dataset_fingerprint, find_data_root, load_manifest, prepare_dataset,
    scan_dataset, split_dataset, split_layout_note,
)
from petalflow.tasks.errors import DatasetError
from tests.helpers import COLOURS, make_dataset, write_image


def _status(manifest, path):
    row = manifest[manifest["path"] == path].iloc[0]
    return row["status"], row["reason"]



def _card(info, summary: dict, tmp_path: Path) -> str:
    """The model card of a version trained on ``info``'s data (``summary``: its
    ``dataset_summary``), without an evaluation folder."""
    from petalflow.tasks.report import model_card

    return model_card({
        "model_name": "m", "model_version": "1", "alias": "champion", "alias_reason": "first",
        "dataset": summary, "manifest": info["manifest"], "comparison": {},
        "test_metrics": {"test_accuracy": 1.0, "test_images": 6, "test_macro_f1": 1.0},
    }, str(tmp_path / "no-evaluation"))


def test_decodability_is_reported_per_file_across_check_batches(tmp_path, monkeypatch):
    """The full-decode check reads its results in batches: every file still gets its own
    answer, bad ones wherever they fall (first, at a batch edge, last)."""
    import petalflow.tasks.dataset as dataset

    monkeypatch.setattr(dataset, "CHECK_BATCH", 2)
    good = write_image(tmp_path / "good.jpg", (200, 40, 40), size=(48, 48), noise=60)
    data = good.read_bytes()
    bad_at = {0, 3, 4, 8}
    paths = []
    for i in range(9):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(data[: len(data) // 2] if i in bad_at else data)
        paths.append(str(path))
    reasons = dataset.check_decodable(paths)
    assert [i for i, r in enumerate(reasons) if r] == sorted(bad_at)
    assert all(reasons[i].startswith("undecodable image") for i in bad_at)

def test_bad_files_are_quarantined_with_reasons_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    (root / "red" / "empty.jpg").write_bytes(b"")
    (root / "red" / "notes.txt").write_text("not an image")
    big = write_image(tmp_path / "big.jpg", (220, 40, 40), size=(64, 64), noise=60).read_bytes()
    (root / "red" / "truncated.jpg").write_bytes(big[: int(len(big) * 0.7)])
    png = write_image(tmp_path / "p.png", (40, 200, 60), fmt="PNG", size=(64, 64), noise=60)
    (root / "green" / "cut.png").write_bytes(png.read_bytes()[:-200])
    # A phone's motion photo: the JPEG, then its video after the end-of-image marker. Whole.
    (root / "green" / "motion.jpg").write_bytes(
        write_image(tmp_path / "m.jpg", (40, 200, 60), seed=11).read_bytes()
        + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "red" / ".DS_Store").write_bytes(b"\0\1\2")
    write_image(root / "green" / "png_named.jpg", (40, 200, 60), fmt="PNG", seed=7)
    write_image(root / "green" / "gif.jpg", (40, 200, 60), fmt="GIF", seed=8)
    write_image(root / "green" / "nested" / "deep.bmp", (40, 200, 60), fmt="BMP", seed=9)
    Image.new("CMYK", (16, 16), (0, 200, 200, 0)).save(root / "blue" / "cmyk.jpg", "JPEG")
    Image.new("L", (16, 16), 90).save(root / "blue" / "gray.jpg", "JPEG")
    Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(root / "blue" / "deep16.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "blue" / "pic.webp", "WEBP")
    # WebPs with an alpha channel (a transparent background), lossy and lossless: TensorFlow
    # refused them 3 channels ("Number of channels requested does not match input").
    Image.new("RGBA", (16, 16), (1, 2, 3, 0)).save(root / "blue" / "clear.webp", "WEBP")
    Image.new("RGBA", (16, 16), (1, 2, 3, 9)).save(root / "blue" / "clear_ll.webp", "WEBP",
                                                   lossless=True)
    frames = [Image.new("RGB", (16, 16), (c, 2, 3)) for c in (10, 200)]
    frames[0].save(root / "blue" / "moving.webp", "WEBP", save_all=True, append_images=frames[1:])
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "blue" / "scan.tiff", "TIFF")
    (root / "LICENSE.txt").write_text("not in a class folder: ignored")

    m = scan_dataset(root)
    assert _status(m, "red/empty.jpg") == ("quarantined", "empty file")
    assert _status(m, "red/notes.txt") == ("quarantined", "not an image file")
    assert _status(m, "red/.DS_Store") == ("quarantined", "hidden file")
    # A copy cut short, the commonest bad image, is called that (TensorFlow said "Invalid
    # JPEG data or crop window"); other damage keeps the decoder's message (below).
    assert _status(m, "red/truncated.jpg") == (
        "quarantined", "undecodable image: JPEG cut short (the file ends before its image data "
        "does: a copy or download that did not finish?)")
    assert _status(m, "green/cut.png")[1].startswith("undecodable image: PNG cut short (")
    assert _status(m, "blue/scan.tiff")[1].startswith("unsupported image format TIFF")
    # TensorFlow decodes still WebP images, not animated ones, saying "WebP Animation must be
    # 4 channel RGBA" (as if an RGBA file would do): the reason says what the file is, in the
    # served model's words.
    assert _status(m, "blue/moving.webp") == (
        "quarantined", "undecodable image: animated WebP (the model reads still images; "
        "TensorFlow cannot decode an animated WebP): save one frame as a still WebP, PNG or "
        "JPEG first")
    for used in ("green/png_named.jpg", "green/gif.jpg", "green/nested/deep.bmp",
                 "blue/cmyk.jpg", "blue/gray.jpg", "blue/deep16.png", "blue/pic.webp",
                 "green/motion.jpg", "blue/clear.webp", "blue/clear_ll.webp"):
        assert _status(m, used) == ("ok", ""), used
    counts = dataset_counts(m)
    assert counts["found"] == counts["used"] + counts["quarantined"] == 12 + 17
    assert counts["quarantined"] == 7
    assert "LICENSE.txt" not in set(m["path"])
    ok = m[m["status"] == "ok"]
    assert (ok["width"] > 0).all() and (ok["height"] > 0).all()


def test_a_colour_palette_or_1_bit_bmp_is_quarantined_saying_why_a_grey_one_used(tmp_path):
    """TensorFlow reads an 8-bit BMP's palette indices as grey levels: right for a grey ramp,
    another picture for a colour palette (silently): that one is quarantined, saying why."""
    import tensorflow as tf

    root = make_dataset(tmp_path / "d", per_class=4)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    photo.quantize(64).save(root / "red" / "paint.bmp")
    photo.convert("L").save(root / "blue" / "scan.bmp")
    photo.convert("1").save(root / "green" / "fax.bmp")  # TensorFlow: "... was 0"
    decoded = tf.io.decode_image((root / "red" / "paint.bmp").read_bytes(), channels=3).numpy()
    assert np.abs(decoded.astype(int) - np.asarray(photo.quantize(64).convert("RGB"))).max() > 50
    m = scan_dataset(root)
    assert _status(m, "red/paint.bmp") == (
        "quarantined", "colour-palette BMP: TensorFlow's decoder reads its palette indices as "
                       "grey levels; save it as a 24-bit BMP or a PNG")
    assert _status(m, "green/fax.bmp") == (
        "quarantined", "1-bit (black and white) BMP: TensorFlow's decoder reads 24/32-bit and "
                       "8-bit grey BMPs; save it as a PNG or a 24-bit BMP")
    assert _status(m, "blue/scan.bmp") == ("ok", "")
    grey = tf.io.decode_image((root / "blue" / "scan.bmp").read_bytes(), channels=3).numpy()
    assert (grey[..., 0] == np.asarray(photo.convert("L"))).all()


def test_the_scan_records_each_photos_exif_orientation_and_counts_the_turned(tmp_path):
    """The manifest says how each file is turned (its EXIF, as PIL reads it), the counts how
    many usable ones are: training reads EXIF only when some are (``reads_exif``)."""
    from pathlib import Path

    from petalflow.tasks.dataset import load_manifest, orientation_note, reads_exif
    from tests.helpers import phone_jpeg, quadrants

    root = make_dataset(tmp_path / "d", per_class=4)
    plain = prepare_dataset(root, tmp_path / "m1", 0.25, 0.25, 0)
    assert plain["counts"]["turned"] == 0 and not reads_exif(plain)
    (root / "red" / "portrait.jpg").write_bytes(phone_jpeg(quadrants(), 6))
    (root / "red" / "mirrored.jpg").write_bytes(phone_jpeg(quadrants(), 2, "MM"))
    (root / "red" / "upright.jpg").write_bytes(phone_jpeg(quadrants(), 1))
    (root / "red" / "broken.jpg").write_bytes(phone_jpeg(quadrants(), 6)[:300])
    info = prepare_dataset(root, tmp_path / "m2", 0.25, 0.25, 0)
    m = load_manifest(Path(info["manifest"])).set_index("path")
    assert m.loc["red/portrait.jpg", "orientation"] == 6
    assert m.loc["red/mirrored.jpg", "orientation"] == 2
    assert m.loc["red/upright.jpg", "orientation"] == 1
    assert m.loc["red/000.jpg", "orientation"] == 1
    assert m.loc["red/broken.jpg", ["status", "orientation"]].tolist() == ["quarantined", 1]
    assert info["counts"]["turned"] == 2 and reads_exif(info)
    assert orientation_note(info["counts"]) == (
        "2 photos stored turned (EXIF Orientation, as phones store portrait photos): decoded "
        "upright, in training as in serving")
    assert orientation_note(plain["counts"]) is None
    # A dataset description without the counts (an older scan): read EXIF to be safe.
    assert reads_exif({**info, "counts": {k: v for k, v in plain["counts"].items()
                                          if k not in ("turned", "exif_unreadable")}})
    # EXIF PIL cannot read: training reads it as the served graph does.
    assert reads_exif({**plain, "counts": {**plain["counts"], "exif_unreadable": 1}})


def test_a_camera_jpeg_with_more_pictures_is_used_with_its_orientation(tmp_path):
    """A JPEG carrying further pictures (MPF: a camera's preview, a phone's depth or HDR gain
    map) is "MPO" to PIL, and was quarantined as an unsupported format: it is a JPEG, its
    first picture the photo, which TensorFlow decodes; its EXIF orientation is read."""
    root = make_dataset(tmp_path / "d", per_class=4)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 48, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(root / "red" / "camera.jpg", "MPO", save_all=True, exif=exif.tobytes(),
               append_images=[photo.resize((16, 8))])
    assert Image.open(root / "red" / "camera.jpg").format == "MPO"
    m = scan_dataset(root).set_index("path")
    assert m.loc["red/camera.jpg", ["status", "reason", "width", "height", "orientation"]] \
        .tolist() == ["ok", "", 48, 32, 6]


def test_linked_folders_inside_a_class_are_followed_once_and_loops_are_not(tmp_path):
    """A folder dataset organised with links (a class folder linking a folder of photos kept
    elsewhere): its photos were silently left out of the scan, of the folder source's change
    fingerprint and of `petalflow predict`'s inputs. Linked folders are followed; a link back
    to a folder already walked (a loop) is not."""
    import os

    from petalflow.tasks.download import folder_listing
    from petalflow.tasks.predict import iter_inputs

    elsewhere = make_dataset(tmp_path / "elsewhere", per_class=4)
    root = make_dataset(tmp_path / "data", per_class=3)
    os.symlink(elsewhere / "red", root / "red" / "more")
    os.symlink(root / "red", root / "red" / "loop")  # back to its own class folder
    os.symlink(root, root / "green" / "up")  # to the dataset's top
    os.symlink("/", root / "blue" / "everything")  # to the file system's top
    before = folder_listing(root)[0]
    manifest = scan_dataset(root)
    counts = manifest[manifest["status"] == "ok"].groupby("label").size().to_dict()
    assert counts == {"blue": 3, "green": 3, "red": 7}
    assert sorted(p for p in manifest["path"] if p.startswith("red/more/")) == [
        f"red/more/{i:03d}.jpg" for i in range(4)]
    listed = list(iter_inputs([str(root / "red")]))
    assert len(listed) == 7 and root / "red" / "more" / "000.jpg" in listed
    write_image(elsewhere / "red" / "new.jpg", (220, 40, 40), seed=99)
    assert folder_listing(root)[0] != before


def test_a_folder_of_archives_says_to_extract_them(tmp_path):
    """A folder source holding the dataset's archives (one zip per class, or the .tgz itself)
    failed as "need at least 2 classes ..., found 0 (none)": petalflow opens the archives inside
    a downloaded archive, never in the user's own folder; the error says so, naming them."""
    from tests.helpers import make_tgz, make_zip

    src = make_dataset(tmp_path / "src", per_class=3)
    folder = tmp_path / "mine" / "data"
    for name in ("red", "blue", "green"):
        make_zip(src / name, folder / f"{name}.zip", arcname=name)
    make_tgz(src, folder / "all.tgz")
    with pytest.raises(DatasetError) as refused:
        scan_dataset(folder)
    assert str(refused.value) == (
        f"{folder} holds archives (all.tgz, blue.zip, green.zip, ...) and no folder of images: "
        "extract them there (archives are opened inside an archive given as --data-url, not in "
        "a folder)")


def test_same_image_under_two_labels_is_quarantined(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    shutil.copy(root / "red" / "000.jpg", root / "blue" / "stolen.jpg")
    m = scan_dataset(root)
    assert _status(m, "blue/stolen.jpg")[0] == "quarantined"
    assert _status(m, "red/000.jpg")[1] == "same image found under labels blue, red"


def test_split_is_stratified_deterministic_and_keeps_duplicates_together(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=20)
    for i in range(3):  # the same bytes three times in one class
        shutil.copy(root / "red" / "000.jpg", root / "red" / f"dup{i}.jpg")
    m = scan_dataset(root)
    a = split_dataset(m, 0.2, 0.2, seed=1)
    b = split_dataset(m, 0.2, 0.2, seed=1)
    c = split_dataset(m, 0.2, 0.2, seed=2)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()
    for label in ("blue", "green", "red"):
        sizes = a[a["label"] == label]["split"].value_counts()
        assert sizes["test"] == 4 and sizes["val"] == 4
    assert a.groupby("sha256")["split"].nunique().max() == 1
    assert dataset_fingerprint(a) == dataset_fingerprint(b)


def test_fingerprint_changes_with_the_data(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    before = dataset_fingerprint(scan_dataset(root))
    write_image(root / "red" / "new.jpg", (200, 0, 0), seed=99)
    assert dataset_fingerprint(scan_dataset(root)) != before


def test_one_class_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=5, colours={"only": (1, 2, 3)})
    with pytest.raises(DatasetError, match="at least 2 classes"):
        split_dataset(scan_dataset(root), 0.15, 0.15, 0)


def test_one_class_folder_given_as_the_dataset_says_to_give_the_folder_above(tmp_path):
    """The path of one class's folder typed into the form (flowers/roses instead of flowers):
    "found 0 (none); put each class's images in its own subfolder" (they are). Now it says the
    images lie in the folder itself, as in one class's folder, and names the folder above when
    that holds the class folders; an extracted archive's folder, which has no such parent, is
    told only the first part."""
    root = make_dataset(tmp_path / "flowers", per_class=4)
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(root / "red", tmp_path / "out", 0.25, 0.25, 0)
    assert str(exc.value) == (
        f"need at least 2 classes with usable images, found 0 (none): the 4 images lie in "
        f"{root / 'red'} itself, with no class folder: a folder of one class? Give the folder "
        f"that holds one subfolder per class: {root} (it holds 3: blue, green, red)")
    alone = make_dataset(tmp_path / "extracted" / "abc123", per_class=3,
                         colours={"photos": (1, 2, 3)}) / "photos"
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(alone, tmp_path / "out2", 0.25, 0.25, 0)
    assert str(exc.value) == (
        f"need at least 2 classes with usable images, found 0 (none): the 3 images lie in "
        f"{alone} itself, with no class folder: a folder of one class? Give the folder that "
        "holds one subfolder per class")
    # An archive of one class's folder (roses.tgz): its extraction's path means nothing to
    # the person who packed it; the archive's folder is named, and what to pack.
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(alone, tmp_path / "out3", 0.25, 0.25, 0, unchanging=True)
    assert str(exc.value) == (
        "need at least 2 classes with usable images, found 0 (none): the 3 images lie in the "
        "archive's photos/ itself, with no class folder: an archive of one class's folder? "
        "Pack the folder that holds one subfolder per class (tar -czf dataset.tgz dataset/)")
    top = make_dataset(tmp_path / "extracted" / ("ab" * 32), per_class=3,
                       colours={"x": (1, 2, 3)}) / "x"
    for photo in top.iterdir():
        photo.rename(top.parent / photo.name)
    top.rmdir()
    with pytest.raises(DatasetError, match="the 3 images lie at the archive's top level, with "
                       "no class folder: an archive of one class's folder"):
        prepare_dataset(top.parent, tmp_path / "out4", 0.25, 0.25, 0, unchanging=True)


def test_a_dataset_of_tiffs_says_its_images_are_unusable_not_that_the_layout_is_wrong(tmp_path):
    """UC Merced's land-use photos are TIFFs in one folder per class: every file quarantined.
    The error says so, with the reason and a file, not "put each class's images in its own
    subfolder" (they are); likewise when one class is usable and the others are not."""
    from petalflow.tasks.errors import UnusableImages

    root = tmp_path / "UCMerced_LandUse" / "Images"
    for c, (name, rgb) in enumerate([("beach", (230, 210, 150)), ("forest", (20, 120, 30)),
                                     ("river", (40, 80, 200))]):
        for i in range(4):
            write_image(root / name / f"{name}{i:02d}.tif", rgb, fmt="TIFF", seed=10 * c + i)
    (root.parent / "readme.txt").write_text("21 classes, 100 images each")
    from petalflow.tasks.dataset import find_data_root

    assert find_data_root(tmp_path / "UCMerced_LandUse") == root
    with pytest.raises(UnusableImages) as exc:
        prepare_dataset(root, tmp_path / "out", 0.15, 0.15, 0)
    assert str(exc.value) == (
        "need at least 2 classes with usable images, found 0 (none): the 12 image files in "
        "beach, forest, river were quarantined: unsupported image format TIFF (supported: "
        "JPEG, PNG, GIF, BMP, WEBP); e.g. beach/beach00.tif")

    for i in range(5):
        write_image(root / "forest" / f"forest{i:02d}.jpg", (20, 120, 30), seed=50 + i)
    (root / "river" / "notes.txt").write_text("taken from a plane")
    with pytest.raises(UnusableImages) as exc:
        split_dataset(scan_dataset(root), 0.15, 0.15, 0)
    assert str(exc.value) == (
        "need at least 2 classes with usable images, found 1 (forest): the 8 image files in "
        "beach, river were quarantined: unsupported image format TIFF (supported: JPEG, PNG, "
        "GIF, BMP, WEBP); e.g. beach/beach00.tif")

    # Only notes beside the one class: the layout is what is wrong, and it says so.
    shutil.rmtree(root / "beach")
    for tif in (root / "river").glob("*.tif"):
        tif.unlink()
    with pytest.raises(DatasetError) as exc:
        split_dataset(scan_dataset(root), 0.15, 0.15, 0)
    assert not isinstance(exc.value, UnusableImages)
    assert str(exc.value).endswith("found 1 (forest); put each class's images in its own "
                                   "subfolder")


def test_class_too_small_to_split_is_named(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=6)
    for extra in (root / "green").glob("00[2-5].jpg"):
        extra.unlink()
    with pytest.raises(DatasetError, match="class 'green' has 2 distinct usable images"):
        split_dataset(scan_dataset(root), 0.15, 0.15, 0)


def test_every_class_too_small_to_split_is_named_at_once(tmp_path):
    """A long-tailed dataset (many classes of a photo or two) named one small class per run:
    fixing them took a run each. All are named, fewest first (ten, then how many more)."""
    root = make_dataset(tmp_path / "d", per_class=6)
    for i in range(14):
        for j in range(1 + i % 2):
            write_image(root / f"rare{i:02d}" / f"{j}.jpg", (10 * i, 90, 90 * j), seed=50 + 2 * i + j)
    (root / "rare99").mkdir()  # no image: skipped, as before, not "too small"
    with pytest.raises(DatasetError) as info:
        split_dataset(scan_dataset(root), 0.15, 0.15, 0)
    assert str(info.value) == (
        "14 classes have too few distinct usable images to split into train/val/test (at "
        "least 3 each, val_fraction=0.15, test_fraction=0.15): 'rare00' (1), 'rare02' (1), "
        "'rare04' (1), 'rare06' (1), 'rare08' (1), 'rare10' (1), 'rare12' (1), 'rare01' (2), "
        "'rare03' (2), 'rare05' (2) and 4 more. Add images or remove those class folders.")


def test_a_class_of_photos_in_a_format_pil_cannot_read_says_why_it_is_unusable(tmp_path):
    """iPhone photos (HEIC): each quarantined as an unsupported image format (not "not an image
    file"), named by its bytes as the served model names it (HEIC/HEIF, also when renamed
    .jpg; it was "(.HEIC file ...)", and a renamed one "(.jpg file ...)"), and the class's
    error says what happened to its files."""
    root = make_dataset(tmp_path / "d", per_class=5)
    (root / "iphone").mkdir()
    for i in range(4):
        (root / "iphone" / f"IMG_{i}.{'jpg' if i == 3 else 'HEIC'}").write_bytes(
            b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(100 + i))
    (root / "iphone" / "notes.txt").write_text("from my phone")
    m = scan_dataset(root)
    heic = "unsupported image format HEIC/HEIF (supported: JPEG, PNG, GIF, BMP, WEBP)"
    assert _status(m, "iphone/IMG_0.HEIC") == _status(m, "iphone/IMG_3.jpg") == (
        "quarantined", heic)
    assert _status(m, "iphone/notes.txt") == ("quarantined", "not an image file")
    with pytest.raises(DatasetError) as exc:
        split_dataset(m, 0.2, 0.2, 0)
    assert ("class 'iphone' has 0 distinct usable images; at least 3 are needed to split it "
            "into train/val/test (val_fraction=0.2, test_fraction=0.2). 5 of its files were "
            f"quarantined, 4 of them: {heic}. Add images or remove the class folder."
            ) == str(exc.value)


def test_a_web_page_saved_under_a_photos_name_is_called_that(tmp_path):
    """Photos fetched from a list of URLs (a scraper, wget -i) include the error or sign-in
    pages some URLs answered, saved under the photo's name: each was quarantined as an
    "unsupported image format (.jpg file ...)", which sends the user looking for a converter.
    It is called a web page, and a text file named as a photo text, their kind "not an image
    file"; a file named as an image that is none of these nor a format the served model names
    keeps the words by its suffix."""
    from petalflow.tasks.dataset import count_by_kind

    root = make_dataset(tmp_path / "d", per_class=4)
    (root / "red" / "0042.jpg").write_bytes(
        b"\xef\xbb\xbf\n<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>")
    (root / "red" / "0043.png").write_bytes(b"<HTML><BODY>Please sign in</BODY></HTML>")
    (root / "blue" / "odd.jpg").write_bytes(b"\x00\x01 some format nobody knows" * 4)
    (root / "blue" / "caption.jpg").write_text("A blue sky, taken in 2019\nby me")
    m = scan_dataset(root)
    page = ("not an image file: a web page (HTML) named {}, a download that got an error or "
            "sign-in page instead?")
    names = ("red/0042.jpg", "red/0043.png", "blue/odd.jpg", "blue/caption.jpg")
    assert {name: _status(m, name) for name in names} == {name: ("quarantined", reason) for
                                                          name, reason in zip(names, (
        page.format(".jpg"), page.format(".png"),
        "unsupported image format (.jpg file; supported: JPEG, PNG, GIF, BMP, WEBP)",
        "not an image file: text named .jpg (it begins 'A blue sky, taken in 2019')"))}
    reasons = dict(zip(m["path"], m["reason"]))
    assert count_by_kind({k: v for k, v in reasons.items() if v}) == {
        "not an image file": 3, "unsupported image format": 1}


def test_empty_class_folder_is_ignored_and_reported(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    (root / "empty class").mkdir()
    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"]
    assert info["counts"]["empty_class_folders"] == ["empty class"]


def test_images_outside_every_class_folder_are_counted_and_named_not_silently_dropped(tmp_path):
    """Photos left in the dataset folder itself (a class's photos extracted one level too
    high): not used, as before, but the counts, the summary and the log's note say so."""
    from petalflow.tasks.dataset import dataset_summary

    root = make_dataset(tmp_path / "d", per_class=4)
    for i in range(7):
        write_image(root / f"IMG_{i:04d}.jpg", (250, 250, 0), seed=70 + i)
    (root / "LICENSE.txt").write_text("CC-BY")
    (root / ".cover.jpg").write_bytes(b"hidden")
    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"]
    assert info["counts"]["found"] == 12  # the class folders' files, as before
    summary = dataset_summary(info)
    assert summary["loose_images"] == 7
    assert summary["loose_image_examples"] == [f"IMG_{i:04d}.jpg" for i in range(5)]
    assert split_layout_note(info["counts"]) == (
        "7 images lie in the dataset folder itself, outside every class folder, and are not "
        "used (e.g. IMG_0000.jpg, IMG_0001.jpg, IMG_0002.jpg): move each into its class's "
        "folder")

    for extra in root.glob("IMG_*.jpg"):
        extra.unlink()
    info = prepare_dataset(root, tmp_path / "out2", 0.25, 0.25, 0)
    assert info["counts"]["loose_images"] == 0 and split_layout_note(info["counts"]) is None


def test_a_nas_or_system_folder_is_no_class_and_its_files_are_no_photos(tmp_path):
    """A dataset folder kept on a NAS or a removable drive holds the system's own folders: a
    Synology NAS writes each photo's thumbnails into an ``@eaDir/`` beside it (five smaller
    copies: in the scan they were photos of the class, and a test photo's thumbnails landed in
    the training split), keeps deleted files in ``#recycle/`` (a class of its own, "#recycle",
    of photos of every class), Windows its recycle bin in ``$RECYCLE.BIN/``. None is a class,
    their files are not used, and those inside a class folder are counted as quarantined,
    saying why."""
    root = make_dataset(tmp_path / "d", per_class=6)
    for photo in sorted((root / "blue").glob("*.jpg")):
        thumbs = root / "blue" / "@eaDir" / photo.name
        thumbs.mkdir(parents=True)
        with Image.open(photo) as im:
            for name, side in (("SYNOPHOTO_THUMB_M.jpg", 16), ("SYNOPHOTO_THUMB_S.jpg", 8)):
                im.resize((side, side)).save(thumbs / name, "JPEG", quality=80)
        (root / "blue" / "@eaDir" / f"{photo.name}@SynoEAStream").write_bytes(b"\0" * 40)
    for label in ("red", "green"):
        write_image(root / "#recycle" / label / "deleted.jpg", (90, 90, 90), seed=31)
    write_image(root / "$RECYCLE.BIN" / "S-1-5-21-1004" / "$RAB12CD.jpg", (5, 5, 5), seed=32)
    (root / "System Volume Information").mkdir()
    (root / "System Volume Information" / "IndexerVolumeGuid").write_bytes(b"{0}")
    write_image(root / "@eaDir" / "red@SynoResource" / "SYNOPHOTO_THUMB_M.jpg", (1, 2, 3))

    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"]
    counts = info["counts"]
    assert counts["used"] == 18 and counts["splits"]["train"] == 18 - 2 * 3 * 2
    manifest = load_manifest(info["manifest"])
    used = manifest.loc[manifest["status"] == "ok", "path"].tolist()
    assert not [p for p in used if "@eaDir" in p or "#recycle" in p or "RECYCLE" in p]
    thumbs = manifest[manifest["path"].str.startswith("blue/@eaDir/")]
    assert len(thumbs) == 6 * 3 and (thumbs["status"] == "quarantined").all()
    assert set(thumbs["reason"]) == {
        "in @eaDir/, a Synology NAS's thumbnails and metadata, not a photo of the class"}
    assert counts["found"] == 18 + 18  # the class folders' files: found = used + quarantined
    assert counts["quarantined"] == 18
    # Wrapped in one folder beside the NAS's own: still found as the data root.
    wrapped = tmp_path / "share"
    shutil.copytree(root, wrapped / "photos")
    (wrapped / "#recycle").mkdir()
    (wrapped / "@eaDir" / "photos@SynoResource").mkdir(parents=True)
    assert find_data_root(wrapped) == wrapped / "photos"


def test_a_folder_to_classify_on_a_nas_gives_its_photos_not_the_systems_copies(tmp_path):
    """``petalflow predict --input`` / ``batch-predict`` on a NAS folder: the thumbnails a
    Synology NAS keeps beside every photo (``@eaDir/``) and the recycle bins' deleted photos
    were classified as images of their own (three rows for one photo here); a file in such a
    folder named on its own is still classified."""
    from petalflow.tasks.predict import iter_inputs

    folder = tmp_path / "incoming"
    for name in ("a.jpg", "b.jpg"):
        write_image(folder / name, (200, 30, 30))
        for thumb in ("SYNOPHOTO_THUMB_M.jpg", "SYNOPHOTO_THUMB_S.jpg"):
            write_image(folder / "@eaDir" / name / thumb, (200, 30, 30), size=(8, 8))
    write_image(folder / "#recycle" / "old.jpg", (1, 1, 1))
    write_image(folder / "$Recycle.Bin" / "S-1-5-21" / "$RXYZ.jpg", (1, 1, 1))
    write_image(folder / "week 2" / "c.jpg", (30, 30, 200))
    assert list(iter_inputs([str(folder)])) == [folder / "a.jpg", folder / "b.jpg",
                                                folder / "week 2" / "c.jpg"]
    named = folder / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_M.jpg"
    assert list(iter_inputs([str(named)])) == [named]


def test_a_class_name_written_decomposed_and_composed_is_one_class(tmp_path):
    """"café" from a zip made on macOS (decomposed: e + U+0301) beside "café" typed elsewhere
    (composed): one class, named in the composed form, not two classes that look the same;
    a split dataset's folders merge the same way, and no folder is reported empty."""
    import unicodedata

    from petalflow.tasks.dataset import dataset_counts

    composed = "caf\u00e9"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    root = tmp_path / "d"
    for i in range(3):
        write_image(root / composed / f"a{i}.jpg", COLOURS["red"], seed=i)
        write_image(root / decomposed / f"b{i}.jpg", COLOURS["red"], seed=10 + i)
        write_image(root / "tea" / f"c{i}.jpg", COLOURS["green"], seed=20 + i)
    info = prepare_dataset(root, tmp_path / "m", 0.2, 0.2, seed=0)
    assert info["classes"] == [composed, "tea"]
    m = scan_dataset(root)
    assert sorted(m["label"].unique()) == [composed, "tea"]
    assert (m["label"] == composed).sum() == 6
    assert dataset_counts(m)["found"] == 9
    assert info["counts"]["empty_class_folders"] == []
    split = tmp_path / "split"
    for i in range(3):
        write_image(split / "train" / decomposed / f"a{i}.jpg", COLOURS["red"], seed=30 + i)
        write_image(split / "test" / composed / f"b{i}.jpg", COLOURS["red"], seed=40 + i)
        write_image(split / "train" / "tea" / f"c{i}.jpg", COLOURS["green"], seed=50 + i)
        write_image(split / "test" / "tea" / f"d{i}.jpg", COLOURS["green"], seed=60 + i)
    assert prepare_dataset(split, tmp_path / "m2", 0.2, 0.2, seed=0)["classes"] == [composed,
                                                                                   "tea"]


def test_a_dataset_delivered_already_split_is_classified_by_its_class_folders(tmp_path):
    """train/<class>, Valid/<class>, test/ with unlabeled images (a common download): the
    classes are the class folders, merged across the splits (not "train" vs "Valid"); the
    unlabeled test/ is not used, and the run report says both."""
    from petalflow.tasks.dataset import dataset_summary

    root = tmp_path / "d"
    make_dataset(root / "train", per_class=6)
    make_dataset(root / "Valid", per_class=3, seed=1)
    (root / "Valid" / "purple").mkdir()  # a class folder with nothing in it
    write_image(root / "test" / "unknown.jpg", (200, 40, 40))
    (root / "README.txt").write_text("photos, split by the provider")
    info = prepare_dataset(root, tmp_path / "out", 0.2, 0.2, 0)
    assert info["classes"] == ["blue", "green", "red"]
    counts = info["counts"]
    assert counts["split_folders"] == ["Valid", "train"]
    assert counts["unlabeled_split_folders"] == ["test"]
    assert counts["empty_class_folders"] == ["purple"]
    assert counts["used"] == 3 * (6 + 3) and counts["quarantined"] == 0
    m = scan_dataset(root)
    assert _status(m, "Valid/red/000.jpg") == ("ok", "")
    assert m.loc[m["path"] == "Valid/red/000.jpg", "label"].item() == "red"
    assert m.loc[m["path"] == "train/green/005.jpg", "label"].item() == "green"
    assert not m["path"].str.startswith("test/").any()
    summary = dataset_summary(info)
    assert summary["split_folders"] == ["Valid", "train"]
    report = _card(info, summary, tmp_path)
    assert ("The dataset comes already split (Valid/, train/): each class is its folders in "
            "all of them, split again by petalflow; test/ holds no class folders (unlabeled "
            "images) and is not used.") in report


def test_a_folder_of_datasets_given_as_the_dataset_is_said_to_be_one(tmp_path):
    """A folder holding two datasets (data/flowers/daisy/…, data/pets/cat/…) given as the
    dataset trained "flowers vs pets", each a class of merged subfolders, and the log said
    only "2 classes". The log's note and the model card now say every class's images lie in
    subfolders of its folder, name them, and say what to give if the subfolders are the
    classes. Classes of which only some are organised in subfolders (a class of dated folders
    beside flat ones) get no such note."""
    from petalflow.tasks.dataset import dataset_summary, split_layout_note

    data = tmp_path / "data"
    make_dataset(data / "flowers", per_class=4)
    make_dataset(data / "pets", per_class=4, colours={"cat": (200, 200, 30), "dog": (30, 200, 200)},
                 seed=5)
    info = prepare_dataset(data, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["flowers", "pets"]
    said = ("every class's images lie in subfolders of its folder (flowers/: 3, blue/, green/, "
            "red/; pets/: 2, cat/, dog/): each class is trained as one, its subfolders merged; "
            "if the subfolders are the classes, give one of these folders as the dataset")
    assert split_layout_note(info["counts"]) == said
    summary = dataset_summary(info)
    assert split_layout_note(summary) == said
    card = _card(info, summary, tmp_path)
    assert said[0].upper() + said[1:] + "." in card
    # One class of dated subfolders beside flat classes: a layout of its own, no note.
    root = make_dataset(tmp_path / "flat", per_class=4)
    for i, year in enumerate(("2019", "2020")):
        write_image(root / "purple" / year / "a.jpg", (120 + 10 * i, 0, 120), seed=i)
        write_image(root / "purple" / year / "b.jpg", (120 + 10 * i, 10, 120), seed=9 + i)
    flat = prepare_dataset(root, tmp_path / "out2", 0.25, 0.25, 0)
    assert "purple" in flat["classes"] and split_layout_note(flat["counts"]) is None


def test_a_class_whose_images_all_lie_in_one_subfolder_is_named_with_it(tmp_path):
    """Class folders at mixed depths (photos/roses/*.jpg beside photos/more/tulips/*.jpg: a
    folder moved into another by a slip of the mouse, or a download extracted into its own
    folder) train "more", the folder holding the images' folder, as Keras'
    image_dataset_from_directory labels it; the log said only "3 classes" and the served
    model answered "more" for tulips. The log's warning, the summary and the model card now
    name such a class and its one subfolder. Classes that each hold their images in one
    subfolder of their own (cats/images/, dogs/images/) are a layout of their own: no note."""
    from petalflow.tasks.dataset import dataset_summary, tucked_classes_note

    root = make_dataset(tmp_path / "photos", per_class=4)
    (root / "red").rename(tmp_path / "red")
    (root / "more").mkdir()
    (tmp_path / "red").rename(root / "more" / "red")
    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "more"]  # labelled as before
    said = ("more/ holds its images only in its subfolder red/, while the other classes hold "
            "theirs in their own folders: it is trained as the class \"more\"; if red is the "
            "class, move red/ up beside the other class folders")
    assert tucked_classes_note(info["counts"]) == said
    summary = dataset_summary(info)
    assert [tuple(c) for c in summary["classes_in_one_subfolder"]] == [("more", "red")]
    assert tucked_classes_note(summary) == said
    assert said[0].upper() + said[1:] + "." in _card(info, summary, tmp_path)
    # A reused scan (an extracted archive's), also one written before these were counted.
    described = tmp_path / "out" / "dataset.json"
    written = json.loads(described.read_text())
    del written["counts"]["classes_in_one_subfolder"]
    described.write_text(json.dumps(written))
    again = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0, unchanging=True)
    assert again["counts"]["found"] == info["counts"]["found"]
    assert tucked_classes_note(again["counts"]) == said

    each = make_dataset(tmp_path / "each", per_class=4)
    for name in ("blue", "green", "red"):
        (each / name).rename(tmp_path / f"{name}-images")
        (each / name).mkdir()
        (tmp_path / f"{name}-images").rename(each / name / "images")
    flat = prepare_dataset(each, tmp_path / "out2", 0.25, 0.25, 0)
    assert flat["classes"] == ["blue", "green", "red"]
    assert tucked_classes_note(flat["counts"]) is None


def test_a_copy_of_the_class_folders_inside_the_dataset_is_no_class(tmp_path):
    """A flowers zip holding flowers/daisy/... and flowers/flowers/daisy/... again: the
    inner flowers/ was a sixth class holding every photo, each photo was then "the same image
    under two labels", all were quarantined and the run failed with "found 0 classes; put
    each class's images in its own subfolder". The copy's files count for the classes its
    folders are named after; those that are a file of the same class outside it again are
    quarantined as copies (not decoded, not used twice), others are used."""
    from petalflow.tasks.dataset import dataset_summary

    root = make_dataset(tmp_path / "flowers", per_class=6)
    shutil.copytree(root, tmp_path / "copy")
    shutil.move(tmp_path / "copy", root / "flowers")
    write_image(root / "flowers" / "red" / "extra.jpg", (250, 10, 10), seed=77)  # only here
    # A class folder organised in subfolders of its own stays a class, and so does one whose
    # subfolders are named like other classes but which holds images itself.
    write_image(root / "purple" / "2019" / "a.jpg", (120, 0, 120), seed=1)
    write_image(root / "purple" / "2020" / "b.jpg", (130, 0, 130), seed=2)
    write_image(root / "purple" / "2020" / "c.jpg", (140, 0, 140), seed=6)
    write_image(root / "mixed" / "m.jpg", (90, 90, 90), seed=3)
    write_image(root / "mixed" / "red" / "n.jpg", (91, 90, 90), seed=4)
    write_image(root / "mixed" / "green" / "o.jpg", (92, 90, 90), seed=5)
    info = prepare_dataset(root, tmp_path / "out", 0.2, 0.2, 0)
    assert info["classes"] == ["blue", "green", "mixed", "purple", "red"]
    counts = info["counts"]
    assert counts["nested_copies"] == ["flowers"] and counts["empty_class_folders"] == []
    assert counts["found"] == 2 * 18 + 1 + 6 and counts["used"] == 18 + 1 + 6
    assert counts["quarantine_reasons"]["flowers/red/003.jpg"] == "copy of red/003.jpg"
    assert len(counts["quarantine_reasons"]) == 18
    m = load_manifest(info["manifest"])
    assert m.loc[m["path"] == "flowers/red/extra.jpg", ["label", "status"]].values.tolist() == [
        ["red", "ok"]]
    assert m.loc[m["path"] == "mixed/red/n.jpg", "label"].item() == "mixed"
    assert m.loc[m["path"] == "purple/2020/b.jpg", "label"].item() == "purple"
    note = ("flowers/ holds the class folders again (a copy of the dataset inside it): its files "
            "count for the classes their folders are named after, and the 18 with the bytes of a "
            "file of the same class outside it are quarantined as copies")
    assert split_layout_note(counts) == note
    summary = dataset_summary(info)
    assert summary["nested_copies"] == ["flowers"]
    report = _card(info, summary, tmp_path)
    assert note[0].upper() + note[1:] + "." in report
    # The copy inside a wrapper of its own (flowers/flowers/flowers/red) is found the same way.
    (root / "flowers").rename(tmp_path / "inner")
    (root / "flowers").mkdir()
    (tmp_path / "inner").rename(root / "flowers" / "flowers")
    (root / "flowers" / "NOTES.md").write_text("a copy")
    again = prepare_dataset(root, tmp_path / "out2", 0.2, 0.2, 0)
    assert again["counts"]["nested_copies"] == ["flowers/flowers"]
    assert again["counts"]["used"] == counts["used"] and again["classes"] == info["classes"]


def test_a_model_card_of_many_classes_fits_the_registry_and_lists_the_top_confusions(tmp_path):
    """With 60 classes the card shows the most frequent confusions, not a 60 x 60 matrix, and
    the registry's description (5,000 characters in MLflow's SQL stores: PostgreSQL refuses
    more) is the card's opening and the sections that fit, naming the ones left out; a
    5-class card keeps its whole matrix and is its own description."""
    from petalflow.tasks.registry import DESCRIPTION_LIMIT
    from petalflow.tasks.report import model_card, shortened_card
    from tests.helpers import many_class_card

    summary, evaluation = many_class_card(tmp_path / "many", 60)
    card = model_card(summary, str(evaluation))
    assert ("60 classes: the whole matrix is in confusion.csv and confusion.png; here, the 18 "
            "most frequent confusions.") in card
    assert "| class 00 of the collection | class 01 of the collection | 1 |" in card
    assert "true \\ predicted" not in card
    assert len(card) > DESCRIPTION_LIMIT
    description = shortened_card(card, DESCRIPTION_LIMIT)
    assert len(description) <= DESCRIPTION_LIMIT
    assert description.startswith("# Model card: m version 1\n\n**champion** — first")
    # Every section keeps at least its lead: the test accuracy's line survives its table.
    assert [line for line in description.splitlines() if line.startswith("## ")] == \
        [line for line in card.splitlines() if line.startswith("## ")]
    assert "Accuracy **0.8570** on 120 held-out images; macro F1 0.8500." in description
    assert "| class | precision | recall | f1 | support |" in card  # the per-class table
    assert "| class | precision | recall | f1 | support |" not in description
    assert description.endswith(
        "*Left out here (the registry keeps 5,000 characters of a description): Test metrics "
        "(its tables); Confusion matrix (its tables). The whole card is the version's run "
        "artifact `model_card.md`.*")

    summary, evaluation = many_class_card(tmp_path / "few", 5)
    card = model_card(summary, str(evaluation))
    assert "| true \\ predicted | class 00 of the collection |" in card
    assert shortened_card(card, DESCRIPTION_LIMIT) == card


def test_a_folder_with_names_that_are_not_utf8_is_refused_naming_them(tmp_path):
    import os

    root = make_dataset(tmp_path / "d", per_class=4)
    bad = os.fsencode(root / "red") + b"/caf\xe9.jpg"
    with open(bad, "wb") as fh:
        fh.write((root / "red" / "000.jpg").read_bytes())
    with pytest.raises(DatasetError, match=r"1 file\(s\) have names that are not UTF-8, e.g. "
                                           r"red/caf\\xe9.jpg: rename them"):
        prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)


@pytest.mark.parametrize("layout", [
    # Intel's image-classification download: each split wrapped once more, unlabeled seg_pred.
    {"seg_train/seg_train": 6, "seg_test/seg_test": 3, "seg_pred/seg_pred": None},
    # Kaggle's cats and dogs: training_set/training_set/<class>, test_set/test_set/<class>.
    {"training_set/training_set": 6, "test_set/test_set": 3},
    {"Training": 6, "Testing": 3},
    # Fruits-360: Training/, Test/, test-multiple_fruits/ (unlabeled), papers/ of PDFs (was:
    # not split, as papers/ is named like no split; trained Training, Test, ... as classes).
    {"Training": 6, "Test": 3, "test-multiple_fruits": None, "papers": "docs"},
])
def test_split_folders_by_other_names_and_wrapped_once_more(tmp_path, layout):
    root = tmp_path / "d"
    for i, (folder, per_class) in enumerate(layout.items()):
        if per_class is None:
            write_image(root / folder / "unknown.jpg", (200, 40, 40))
        elif per_class == "docs":
            (root / folder).mkdir(parents=True)
            (root / folder / "paper.pdf").write_bytes(b"%PDF-1.4\n")
        else:
            make_dataset(root / folder, per_class=per_class, seed=i)
    info = prepare_dataset(root, tmp_path / "out", 0.2, 0.2, 0)
    assert info["classes"] == ["blue", "green", "red"]
    counts = {f.split("/")[0]: n for f, n in layout.items() if n != "docs"}
    assert info["counts"]["split_folders"] == sorted(f for f, n in counts.items() if n)
    assert info["counts"]["unlabeled_split_folders"] == sorted(
        f for f, n in counts.items() if n is None)
    assert info["counts"]["used"] == 3 * sum(n for n in counts.values() if n)


def test_folders_named_like_splits_among_others_are_classes(tmp_path):
    """Only a dataset whose every folder is named like a split, a training one among them with
    class folders inside, counts as delivered split: classes "test" and "control" stay classes,
    and so do "training shoes" and "test tubes"."""
    from petalflow.tasks.dataset import split_folders

    a = tmp_path / "a"
    make_dataset(a, per_class=4, colours={"test": (200, 40, 40), "control": (40, 40, 200)})
    (a / "test" / "more").mkdir()  # a nested folder does not make it a split folder
    write_image(a / "test" / "more" / "x.jpg", (200, 40, 40), seed=5)
    assert split_folders(a) == ([], [])
    assert prepare_dataset(a, tmp_path / "out-a", 0.25, 0.25, 0)["classes"] == ["control",
                                                                                "test"]
    b = tmp_path / "b"
    make_dataset(b, per_class=4, colours={"train": (200, 40, 40), "test": (40, 40, 200)})
    assert split_folders(b) == ([], [])
    # ... but "train" and "test" holding images directly are no classes to learn: refused,
    # saying how to keep them as classes if they are (test_a_split_dataset_whose_labels...).
    with pytest.raises(DatasetError, match=r"test/, train/ are named like the splits of a "
                                           r"dataset.*if these folders are your classes, name "
                                           r"them otherwise"):
        prepare_dataset(b, tmp_path / "out-b", 0.25, 0.25, 0)
    c = tmp_path / "c"
    make_dataset(c, per_class=4, colours={"training shoes": (200, 40, 40),
                                         "test tubes": (40, 40, 200)})
    assert split_folders(c) == ([], [])


def _refused(root, out) -> str:
    """prepare_dataset's DatasetError for ``root``, as the user reads it."""
    with pytest.raises(DatasetError) as info:
        prepare_dataset(root, out, 0.25, 0.25, 0)
    return str(info.value)


def test_a_split_dataset_whose_labels_are_not_folders_is_refused_saying_where_they_are(
        tmp_path):
    """Kaggle's dogs-vs-cats (train/cat.0.jpg, train/dog.0.jpg, test1/1.jpg) was trained as
    two classes, "test1" and "train", and registered; a folder of images beside labels.csv
    failed as "found 1 (images); put each class's images in its own subfolder". Both are
    refused before the scan, naming where the labels are; nothing is written."""
    kaggle = tmp_path / "kaggle"
    for i in range(6):
        write_image(kaggle / "train" / f"cat.{i}.jpg", (200, 40, 40), seed=i)
        write_image(kaggle / "train" / f"dog.{i}.jpg", (40, 40, 200), seed=10 + i)
        write_image(kaggle / "test1" / f"{i + 1}.jpg", (120, 120, 40), seed=20 + i)
    out = tmp_path / "out"
    assert _refused(kaggle, out) == (
        "test1/, train/ are named like the splits of a dataset, not like classes, and no "
        "training split among them holds class folders: petalflow takes each image's class "
        "from the folder it is in. The file names in train/ begin with a label (cat.0.jpg: "
        "cat, dog.0.jpg: dog): move each image into a folder named after it (train/cat/, ...) "
        "and train on train/")
    assert not out.exists()
    # Its train.zip alone (the folder that holds the images is the dataset's).
    assert _refused(kaggle / "train", out) == (
        "need at least 2 classes with usable images, found 0 (none): the 12 images lie in the "
        "dataset folder itself, and their file names begin with a label (cat.0.jpg: cat, "
        "dog.0.jpg: dog): move each image into a folder named after it (cat/, dog/)")
    assert not (out / "manifest.csv").exists()
    # The labels in a table beside the splits.
    table = tmp_path / "table"
    rows = ["id,label"]
    for i in range(6):
        write_image(table / "train_images" / f"{i:04d}.jpg", (200, 40, 40), seed=i)
        write_image(table / "test_images" / f"{100 + i:04d}.jpg", (40, 40, 200), seed=9 + i)
        rows.append(f"{i:04d},{'cat' if i % 2 else 'dog'}")
    (table / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"test_images/, train_images/ are named like the "
                                           r"splits.*\. train\.csv looks like the labels \(it "
                                           r"names 6 of the 6 images\)"):
        prepare_dataset(table, out, 0.25, 0.25, 0)
    # One folder of images beside its labels file.
    flat = tmp_path / "flat"
    for i in range(8):
        write_image(flat / "images" / f"img{i}.png", (200, 40, 40), fmt="PNG", seed=i)
    (flat / "labels.csv").write_text("".join(f"images/img{i}.png,{i % 2}\n" for i in range(8)))
    assert _refused(flat, out) == (
        "need at least 2 classes with usable images, found 1 (images): labels.csv looks like "
        "the labels (it names 8 of the 8 images), but petalflow takes each image's class from "
        "the folder it is in: move the images into one folder per class (e.g. cats/, dogs/) "
        "and train on that")
    assert not (out / "manifest.csv").exists()


def test_a_dataset_of_images_and_annotations_folders_is_refused_naming_its_labels(tmp_path):
    """The Oxford-IIIT Pet archives (TensorFlow's transfer-learning tutorials' dataset):
    images/Abyssinian_1.jpg, ... and annotations/trimaps/Abyssinian_1.png trained as two
    classes, "annotations" and "images". Refused before the scan, saying the names hold the
    labels; images/ alone (its images.tar.gz) is told the same."""
    root = tmp_path / "pets"
    breeds = {"Abyssinian": (200, 120, 40), "Bengal": (180, 150, 60),
              "american_bulldog": (90, 90, 90)}
    for b, (breed, rgb) in enumerate(breeds.items()):
        for i in range(1, 5):
            write_image(root / "images" / f"{breed}_{i}.jpg", rgb, seed=10 * b + i)
            write_image(root / "annotations" / "trimaps" / f"{breed}_{i}.png", (1, 2, 3),
                        fmt="PNG", seed=10 * b + i)
    (root / "annotations" / "list.txt").write_text("Abyssinian_1 1 1 1\n")
    out = tmp_path / "out"
    assert _refused(root, out) == (
        "annotations/, images/ are named like the parts of a dataset (its images, annotations, "
        "masks), not like classes: petalflow takes each image's class from the folder it is "
        "in. The file names in images/ begin with a label (Abyssinian_1.jpg: abyssinian, "
        "Bengal_1.jpg: bengal, american_bulldog_1.jpg: american_bulldog): move each image "
        "into a folder named after it (images/abyssinian/, ...) and train on images/")
    with pytest.raises(DatasetError, match=r"found 0 \(none\): the 12 images lie in the "
                                           r"dataset folder itself, and their file names begin "
                                           r"with a label .*\(abyssinian/, bengal/, "
                                           r"american_bulldog/\)"):
        prepare_dataset(root / "images", out, 0.25, 0.25, 0)
    assert not (out / "manifest.csv").exists()


@pytest.mark.parametrize("layout", ["food-101", "stanford-dogs", "animals-10", "petimages"])
def test_the_class_folders_inside_the_one_part_holding_images_are_found(tmp_path, layout):
    """Food-101 (food-101/images/<class>/ beside food-101/meta/*.txt, *.json), Stanford
    Dogs with its annotations (Images/<class>/ beside Annotation/<class>/<file without an
    extension>), Animals-10 (raw-img/<class>/ beside translate.py) and Microsoft's cats and
    dogs (PetImages/<class>/ beside a licence PDF) were one class and failed "found 1 (images); put each class's images in its own subfolder". The one folder
    holding images is descended into, as a wrapper is."""
    root = tmp_path / "d"
    if layout == "food-101":
        make_dataset(root / "food-101" / "images", per_class=4)
        (root / "food-101" / "meta").mkdir()
        (root / "food-101" / "meta" / "classes.txt").write_text("blue\ngreen\nred\n")
        (root / "food-101" / "meta" / "train.json").write_text('{"blue": ["blue/000"]}')
        images = root / "food-101" / "images"
    elif layout == "stanford-dogs":
        make_dataset(root / "Images", per_class=4)
        for name in ("blue", "green", "red"):
            (root / "Annotation" / name).mkdir(parents=True)
            (root / "Annotation" / name / "000").write_text("<annotation/>")
        images = root / "Images"
    elif layout == "animals-10":  # raw-img/<class>/ beside translate.py (no wrapper's note)
        make_dataset(root / "raw-img", per_class=4)
        (root / "translate.py").write_text("translate = {'cane': 'dog'}\n")
        images = root / "raw-img"
    else:  # Microsoft's cats and dogs (Keras's example): PetImages/ beside a licence PDF
        make_dataset(root / "PetImages", per_class=4)
        (root / "PetImages" / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (root / "CDLA-Permissive-2.0.pdf").write_bytes(b"%PDF-1.5\n")
        (root / "readme[1].txt").write_text("cats and dogs")
        images = root / "PetImages"
    assert find_data_root(root) == images
    info = prepare_dataset(find_data_root(root), tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"] and info["counts"]["used"] == 12
    # Not when another folder holds images too (two classes, one of them nested), or when
    # the one folder with images holds them directly (a single class, an error as before).
    other = tmp_path / "o"
    make_dataset(other / "a" / "x", per_class=2)
    make_dataset(other / "b", per_class=2)
    assert find_data_root(other) == other
    single = tmp_path / "s"
    write_image(single / "images" / "1.jpg", (200, 40, 40))
    (single / "meta").mkdir()
    (single / "meta" / "notes.csv").write_text("1.jpg,red\n")
    assert find_data_root(single) == single


def test_a_copy_of_the_split_folders_beside_them_is_no_class(tmp_path):
    """Kaggle's chest X-rays: chest_xray/{train,test,val}/{NORMAL,PNEUMONIA} and a copy of the
    whole, chest_xray/chest_xray/{train,test,val}/..., beside them: "chest_xray" named like no
    split, so test, train, val and chest_xray were trained as the classes. The splits are
    recognised; the copy's files count for their classes, those with the bytes of a file
    outside it quarantined as copies, and the layout note says so."""
    root = tmp_path / "d" / "chest_xray"
    colours = {"NORMAL": (200, 200, 200), "PNEUMONIA": (90, 90, 90)}
    for i, (split, n) in enumerate({"train": 6, "test": 3, "val": 3}.items()):
        make_dataset(root / split, per_class=n, colours=colours, seed=i)
        shutil.copytree(root / split, root / "chest_xray" / split)
    info = prepare_dataset(find_data_root(tmp_path / "d"), tmp_path / "out", 0.2, 0.2, 0)
    assert info["classes"] == ["NORMAL", "PNEUMONIA"]
    counts = info["counts"]
    assert counts["split_folders"] == ["test", "train", "val"]
    assert counts["nested_copies"] == ["chest_xray/test", "chest_xray/train", "chest_xray/val"]
    assert counts["used"] == 24 and counts["quarantined"] == 24
    assert "chest_xray/val/ hold the class folders again" in split_layout_note(counts)


def test_split_folders_named_with_a_year_or_number_are_splits(tmp_path):
    """COCO-style train2017/<class>, val2017/<class>: were two classes, "train2017" and
    "val2017", every class folder inside them merged into one of those two."""
    root = tmp_path / "d"
    make_dataset(root / "train2017", per_class=6, seed=1)
    make_dataset(root / "val2017", per_class=3, seed=2)
    info = prepare_dataset(root, tmp_path / "out", 0.2, 0.2, 0)
    assert info["classes"] == ["blue", "green", "red"]
    assert info["counts"]["split_folders"] == ["train2017", "val2017"]


def test_folder_without_any_image_is_skipped_but_unreadable_images_are_an_error(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("how these photos were taken")
    (root / "docs" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"]
    assert info["counts"]["empty_class_folders"] == ["docs"]
    assert info["counts"]["found"] == info["counts"]["used"] + info["counts"]["quarantined"]

    # Files named as images that cannot be read: a class the user meant, so say so.
    (root / "black").mkdir()
    for i in range(4):
        (root / "black" / f"{i}.jpg").write_text("not really a jpeg")
    with pytest.raises(DatasetError, match="class 'black' has 0 distinct usable images"):
        prepare_dataset(root, tmp_path / "out2", 0.25, 0.25, 0)


def test_class_names_with_spaces_and_non_ascii(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4,
                        colours={"blühende rose": (200, 0, 0), "wild daisy": (0, 0, 200)})
    m = split_dataset(scan_dataset(root), 0.25, 0.25, 0)
    assert sorted(m["label"].unique()) == ["blühende rose", "wild daisy"]
    assert (m["status"] == "ok").all()


def test_class_names_pandas_would_read_as_values_stay_text_in_the_card_and_tables(tmp_path):
    """Class folders "None" (a defect dataset's "no defect"), "NA", "007" and "010": the
    manifest, the per-class table (read back for the Prefect artifact) and the model card keep
    them as named, not as a missing value or the numbers 7 and 10."""
    from petalflow.tasks.dataset import dataset_summary, load_manifest
    from petalflow.tasks.evaluate import classification_tables, read_per_class
    from petalflow.tasks.report import model_card

    colours = {"None": (200, 0, 0), "NA": (0, 200, 0), "007": (0, 0, 200), "010": (200, 200, 0)}
    info = prepare_dataset(make_dataset(tmp_path / "d", per_class=5, colours=colours),
                           tmp_path / "prepared", 0.2, 0.2, 0)
    assert info["classes"] == ["007", "010", "NA", "None"]
    assert sorted(load_manifest(info["manifest"])["label"].unique()) == info["classes"]
    _, per_class, confusion = classification_tables([0, 1, 2, 3], [0, 1, 3, 3], info["classes"])
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    per_class.to_csv(evaluation / "per_class.csv", index=False)
    confusion.to_csv(evaluation / "confusion.csv")
    assert read_per_class(evaluation / "per_class.csv")["class"].tolist() == info["classes"]
    card = model_card({
        "model_name": "m", "model_version": "1", "alias": "champion", "alias_reason": "first",
        "dataset": dataset_summary(info), "manifest": info["manifest"], "comparison": {},
        "test_metrics": {"test_accuracy": 0.75, "test_images": 4, "test_macro_f1": 0.67},
    }, str(evaluation))
    assert ("| class | precision | recall | f1 | support |\n|---|---|---|---|---|\n"
            "| 007 | 1.0 | 1.0 | 1.0 | 1 |\n| 010 | 1.0 | 1.0 | 1.0 | 1 |\n"
            "| NA | 0.0 | 0.0 | 0.0 | 1 |\n| None | 0.5 | 1.0 | 0.6667 | 1 |\n") in card
    assert "| NA | 0 | 0 | 0 | 1 |" in card  # the confusion matrix: NA taken for None


def test_an_extracted_archive_scanned_before_is_not_scanned_again(tmp_path, monkeypatch):
    """A scheduled run on an unchanged archive found its extraction in place and scanned every
    photo again (hash and decode check: 1-3 s for 1,500-6,000 photos, growing with the data)
    before ending "nothing to do". An extraction never changes, so its manifest is reused:
    same description, no photo read. Not for a folder source (``unchanging`` false), not after
    the extraction was redone in its place, nor from another scan version or split."""
    from petalflow.tasks import dataset

    root = make_dataset(tmp_path / "datasets" / "abc" / "photos", per_class=4)
    first = dataset.prepare_dataset(root, tmp_path / "m1", 0.25, 0.25, seed=0, unchanging=True)

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    with monkeypatch.context() as patched:
        patched.setattr(dataset, "scan_dataset", no_scan)
        again = dataset.prepare_dataset(root, tmp_path / "m1", 0.25, 0.25, seed=0,
                                        unchanging=True)
        assert again == first
        for other in (dict(unchanging=False), dict(out=tmp_path / "m2")):
            with pytest.raises(AssertionError, match="scanned again"):
                dataset.prepare_dataset(root, other.get("out", tmp_path / "m1"), 0.25, 0.25,
                                        seed=0, unchanging=other.get("unchanging", True))
        patched.setattr(dataset, "SCAN_VERSION", dataset.SCAN_VERSION + 1)
        with pytest.raises(AssertionError, match="scanned again"):
            dataset.prepare_dataset(root, tmp_path / "m1", 0.25, 0.25, seed=0, unchanging=True)

    # A description written before images outside the class folders were counted (an earlier
    # petalflow): reused, counted from the folder, and it is a valid training job's dataset.
    from petalflow.tasks.params import TrainParams
    from petalflow.tasks.train import TrainingJob

    folder = root.stat()
    write_image(root / "cover.jpg", (9, 9, 9))  # (the folder's own date kept: the same one)
    os.utime(root, ns=(folder.st_atime_ns, folder.st_mtime_ns))
    written = json.loads((tmp_path / "m1" / "dataset.json").read_text())
    for key in ("loose_images", "loose_image_examples", "quarantined_by_reason"):
        del written["counts"][key]
    # ... and before quarantined files were counted per reason: every file's reason listed.
    written["counts"]["quarantine_reasons"] = {f"red/{i:02d}.xmp": "not an image file"
                                               for i in range(25)}
    (tmp_path / "m1" / "dataset.json").write_text(json.dumps(written))
    with monkeypatch.context() as patched:
        patched.setattr(dataset, "scan_dataset", no_scan)
        older = dataset.prepare_dataset(root, tmp_path / "m1", 0.25, 0.25, seed=0,
                                        unchanging=True)
    assert older["counts"]["loose_images"] == 1
    assert older["counts"]["loose_image_examples"] == ["cover.jpg"]
    assert older["counts"]["quarantined_by_reason"] == {"not an image file": 25}
    assert len(older["counts"]["quarantine_reasons"]) == dataset.SHOWN_REASONS
    # A job from an earlier flow (a training worker updated first) has no such counts.
    del older["counts"]["loose_images"], older["counts"]["loose_image_examples"]
    del older["counts"]["quarantined_by_reason"]
    TrainingJob(dataset=older, params=TrainParams(), workdir="w", run_id="r")
    (root / "cover.jpg").unlink()

    # The extraction redone in its place, now with a photo less: scanned again.
    shutil.rmtree(root)
    make_dataset(root, per_class=4)
    (root / "red" / "003.jpg").unlink()
    redone = dataset.prepare_dataset(root, tmp_path / "m1", 0.25, 0.25, seed=0, unchanging=True)
    assert redone["counts"]["used"] == first["counts"]["used"] - 1
    assert redone["fingerprint"] != first["fingerprint"]


def test_data_that_grew_decodes_only_its_new_files(tmp_path, monkeypatch):
    """Retraining on data that grew behind its URL scanned every photo again: hash, header and a
    full decode of each, the decode most of the scan (3.0 s at 4x the flowers, growing with the
    data while the features pass no longer does). Contents an earlier scan with the same tools
    found usable are now only hashed: the new files are decoded, and the manifest is the one a
    full scan writes. Other tools (TensorFlow upgraded): every file is decoded again."""
    from petalflow.tasks import dataset
    from tests.helpers import phone_jpeg, quadrants

    before = make_dataset(tmp_path / "v1" / "photos", per_class=4)
    (before / "red" / "turned.jpg").write_bytes(phone_jpeg(quadrants(), 6))
    dataset.prepare_dataset(before, tmp_path / "manifests" / "v1", 0.25, 0.25, seed=0)
    grown = tmp_path / "v2" / "photos"
    shutil.copytree(before, grown)
    new = [write_image(grown / c / "new.jpg", rgb, seed=99) for c, rgb in
           (("red", (200, 10, 10)), ("blue", (10, 10, 200)))]
    (grown / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # new, bad
    (grown / "green" / ".hidden.jpg").write_bytes((before / "green" / "000.jpg").read_bytes())
    decoded = []
    check = dataset.check_decodable
    monkeypatch.setattr(dataset, "check_decodable",
                        lambda paths: decoded.extend(paths) or check(paths))
    info = dataset.prepare_dataset(grown, tmp_path / "manifests" / "v2", 0.25, 0.25, seed=0)
    assert sorted(decoded) == sorted(str(p) for p in new)  # broken.jpg: refused by its header
    written = dataset.load_manifest(info["manifest"]).drop(columns="split")
    full = dataset.scan_dataset(grown)
    assert written.sort_values("path").reset_index(drop=True).equals(
        full.sort_values("path").reset_index(drop=True).astype(written.dtypes))
    assert written.set_index("path").loc["red/turned.jpg", "orientation"] == 6
    assert info["counts"]["used"] == 12 + 1 + 2
    decoded.clear()
    monkeypatch.setattr(dataset, "scan_tools", lambda: "scan 1, tensorflow 9.9, pillow 12.0")
    dataset.prepare_dataset(grown, tmp_path / "manifests" / "v3", 0.25, 0.25, seed=0)
    assert len(decoded) == 12 + 1 + 2


def test_a_folder_scanned_again_reads_only_its_new_and_changed_files(tmp_path, monkeypatch):
    """A folder source (scheduled retraining on a folder the data grows in) had every byte of
    every file read and hashed on every run. Files whose size, times and inode an earlier scan
    of that folder recorded are not read again: a new file, and one rewritten with other bytes
    of the same size and its old modification time restored (rsync -t, cp -p), are."""
    import time

    from petalflow.tasks import dataset

    monkeypatch.setattr(dataset, "RACY_NS", 0)  # files made a moment ago count as settled
    root = make_dataset(tmp_path / "d", per_class=4)
    changed = write_image(root / "red" / "kept.bmp", COLOURS["red"], fmt="BMP", seed=7)
    manifests = tmp_path / "manifests"
    first = prepare_dataset(root, manifests / "a", 0.25, 0.25, seed=1)
    assert (manifests / "a" / "file_hashes.csv").is_file()  # beside the manifest (README)
    # An extraction (never changed, its manifest reused) keeps no such record.
    prepare_dataset(root, manifests / "x", 0.2, 0.2, seed=3, unchanging=True)
    assert not (manifests / "x" / "file_hashes.csv").exists()
    read = []
    real = dataset._sha256_bytes
    monkeypatch.setattr(dataset, "_sha256_bytes", lambda path: read.append(
        path.relative_to(root).as_posix()) or real(path))
    assert prepare_dataset(root, manifests / "a", 0.25, 0.25, seed=1) == first
    assert read == []
    # Other split settings (another manifest folder) take what the first scan read too.
    assert prepare_dataset(root, manifests / "b", 0.2, 0.2, seed=2)["fingerprint"] \
        == first["fingerprint"] and read == []

    time.sleep(0.05)  # past the file system's timestamp tick
    st = changed.stat()
    write_image(changed, COLOURS["red"], fmt="BMP", seed=8)  # other pixels, the same size
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed.stat().st_size == st.st_size and changed.stat().st_mtime_ns == st.st_mtime_ns
    write_image(root / "blue" / "new.jpg", COLOURS["blue"], seed=99)
    grown = prepare_dataset(root, manifests / "a", 0.25, 0.25, seed=1)
    assert sorted(read) == ["blue/new.jpg", "red/kept.bmp"]
    manifest = load_manifest(grown["manifest"]).set_index("path")
    assert manifest.at["red/kept.bmp", "sha256"] == hashlib.sha256(changed.read_bytes()
                                                                   ).hexdigest()
    assert grown["counts"]["used"] == first["counts"]["used"] + 1
    assert grown["fingerprint"] != first["fingerprint"]


def test_files_changed_just_before_a_scan_are_read_again_by_the_next(tmp_path):
    """Where times are coarse (FAT: 2 s), a file rewritten right after a scan read it can keep
    times the scan recorded: the scan records no file changed within RACY_NS before it."""
    from petalflow.tasks.dataset import FileHashes

    fresh = write_image(tmp_path / "fresh.jpg", COLOURS["red"])
    settled = write_image(tmp_path / "settled.jpg", COLOURS["blue"])
    hashes = FileHashes()
    hashes._started_ns = settled.stat().st_ctime_ns + 4_000_000_000  # a scan 4 s later
    hashes.sha256(settled, "settled.jpg")
    assert list(hashes.recorded) == ["settled.jpg"]
    hashes = FileHashes()
    assert hashes.sha256(fresh, "fresh.jpg") == (hashlib.sha256(fresh.read_bytes()).hexdigest(),
                                                fresh.stat().st_size)
    assert hashes.recorded == {} and hashes.read == 1


@pytest.mark.parametrize("name, said", [
    ("IMG_0001.jpg.json", "photo metadata (.json, as Google Takeout writes beside each photo)"),
    ("IMG_0001.JPG.supplemental-metadata.json", "photo metadata (.json, as Google Takeout "
                                                "writes beside each photo)"),
    ("IMG_0001.jpg.supplemental-met.json", "photo metadata (.json, as Google Takeout writes "
                                           "beside each photo)"),
    ("IMG_0001.jpg(1).json", "photo metadata (.json, as Google Takeout writes beside each "
                             "photo)"),
    ("IMG_0002.HEIC.json", "photo metadata (.json, as Google Takeout writes beside each photo)"),
    ("metadata.json", "photo metadata (.json, as Google Takeout writes beside each photo)"),
    ("labels.json", "a JSON file (.json)"),
    ("annotations.json", "a JSON file (.json)"),
    ("IMG_0001.json", "a JSON file (.json)"),
])
def test_a_json_file_is_said_to_be_takeouts_only_by_takeouts_names(name, said):
    """A dataset's own labels.json or annotations.json in a class folder is quarantined as a
    JSON file, not as "photo metadata, as Google Takeout writes beside each photo"; Takeout's
    names (the photo's name and .json, its supplemental-metadata forms, an album's
    metadata.json) keep that wording."""
    from petalflow.tasks.dataset import companion_file

    assert companion_file(name) == "not a photo: " + said


def test_files_exported_beside_the_photos_are_named_and_the_summary_stays_short(tmp_path):
    """A Google Photos export (Google Takeout) writes a ``.json`` beside every photo and a
    ``metadata.json`` per album; Windows leaves ``Thumbs.db`` and ``desktop.ini``, editors
    ``.xmp`` sidecars, an iPhone ``.AAE`` edit records and a Live Photo's ``.MOV``. Each was
    "not an image file", as a broken download would be, and the summary printed by
    ``petalflow train`` listed every quarantined file (a 100,000-photo export: 100,000 lines).
    They are named for what they are; the log line says what the quarantined files are; the
    summary and the model card give the count per reason and at most 20 files, every reason
    among them (a broken photo is not hidden behind the metadata); the manifest keeps all."""
    from petalflow.tasks.dataset import dataset_line, dataset_summary

    root = make_dataset(tmp_path / "Takeout" / "Google Photos", per_class=6)
    for label in ("red", "green", "blue"):
        folder = root / label
        for photo in sorted(folder.glob("*.jpg")):
            (folder / f"{photo.name}.json").write_text('{"title": "%s"}' % photo.name)
        (folder / "metadata.json").write_text('{"title": "%s"}' % label)
    (root / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)
    (root / "red" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (root / "green" / "000.xmp").write_text("<x:xmpmeta/>")
    (root / "green" / "IMG_0001.AAE").write_text("<plist/>")
    (root / "blue" / "IMG_0002.MOV").write_bytes(b"\0\0\0\x14ftypqt  " + b"\0" * 40)
    (root / "blue" / "notes.txt").write_text("taken in May")
    good = write_image(tmp_path / "big.jpg", (40, 40, 220), size=(64, 64), noise=60).read_bytes()
    (root / "blue" / "zz_broken.jpg").write_bytes(good[: len(good) * 7 // 10])

    info = prepare_dataset(root, tmp_path / "out", 0.25, 0.25, 0)
    assert info["classes"] == ["blue", "green", "red"] and info["counts"]["used"] == 18
    m = load_manifest(info["manifest"])
    takeout = "not a photo: photo metadata (.json, as Google Takeout writes beside each photo)"
    assert _status(m, "red/000.jpg.json") == ("quarantined", takeout)
    assert _status(m, "red/metadata.json") == ("quarantined", takeout)
    assert _status(m, "red/Thumbs.db") == (
        "quarantined", "not a photo: Windows' thumbnail cache (Thumbs.db)")
    assert _status(m, "red/desktop.ini") == (
        "quarantined", "not a photo: Windows' folder settings (desktop.ini)")
    assert _status(m, "green/000.xmp") == (
        "quarantined", "not a photo: an editor's metadata sidecar (.xmp)")
    assert _status(m, "green/IMG_0001.AAE") == (
        "quarantined", "not a photo: Apple Photos' edit record (.aae)")
    assert _status(m, "blue/IMG_0002.MOV") == ("quarantined", "not a photo: a video (.mov)")
    assert _status(m, "blue/notes.txt") == ("quarantined", "not an image file")
    assert _status(m, "blue/zz_broken.jpg")[1].startswith("undecodable image: JPEG cut short")

    counts = info["counts"]
    assert counts["quarantined"] == 3 * 7 + 7 and (m["status"] == "quarantined").sum() == 28
    assert counts["quarantined_by_reason"] == {
        "not a photo: photo metadata": 21, "not a photo: Windows' thumbnail cache": 1,
        "not a photo: Windows' folder settings": 1, "not a photo: an editor's metadata sidecar": 1,
        "not a photo: Apple Photos' edit record": 1, "not a photo: a video": 1,
        "not an image file": 1, "undecodable image": 1}
    assert list(counts["quarantined_by_reason"])[0] == "not a photo: photo metadata"
    assert dataset_line(info) == (
        "dataset: 3 classes, 46 files found, 18 used, 28 quarantined (21 not a photo: photo "
        "metadata; 1 not a photo: Apple Photos' edit record; 1 not a photo: Windows' folder "
        "settings; 5 more, for 5 other reasons: the model card lists them)")

    summary = dataset_summary(info)
    shown = summary["quarantine_reasons"]
    assert shown == counts["quarantine_reasons"] and len(shown) == 20
    assert set(shown.items()) <= set(zip(m["path"], m["reason"]))
    assert "blue/zz_broken.jpg" in shown and "blue/IMG_0002.MOV" in shown  # every reason
    assert summary["quarantined_by_reason"] == counts["quarantined_by_reason"]
    assert summary["quarantined"] == 28
    card = _card(info, summary, tmp_path)
    assert "| not a photo: photo metadata | 21 |" in card
    assert "| undecodable image | 1 |" in card
    assert "20 of the 28 quarantined files (every file's reason is in the run's manifest)" in card
    assert "- `blue/zz_broken.jpg`: undecodable image: JPEG cut short" in card
    # The description crosses to the training flow as its parameter (kept by Prefect's API,
    # shown in its UI) and into the summary: ten times the metadata files, the same size.
    for i in range(10 * 28):
        (root / "red" / f"extra{i:04d}.jpg.json").write_text("{}")
    grown = prepare_dataset(root, tmp_path / "out2", 0.25, 0.25, 0)
    assert grown["counts"]["quarantined"] == 28 + 280
    assert len(json.dumps(grown)) < len(json.dumps(info)) + 100


def test_the_data_line_counts_quarantined_files_in_the_plural():
    """The log's line about the data read "7 quarantined (2 hidden file; 2 undecodable image;
    1 empty file; …)"."""
    from petalflow.tasks.dataset import dataset_line

    info = {"classes": ["a", "b", "c"], "counts": {
        "found": 132, "used": 120, "quarantined": 12, "quarantined_by_reason": {
            "hidden file": 3, "undecodable image": 2, "copy of a file of the same class": 2,
            "empty file": 1, "not a photo: photo metadata": 2, "unreadable file": 2}}}
    assert dataset_line(info, kinds=4) == (
        "dataset: 3 classes, 132 files found, 120 used, 12 quarantined (3 hidden files; 2 "
        "undecodable images; 2 copies of a file of the same class; 1 empty file; 4 more, for "
        "2 other reasons: the model card lists them)")
    assert dataset_line(info, kinds=6).endswith(
        "; 2 not a photo: photo metadata; 2 unreadable files)")


def test_class_folders_whose_names_differ_only_in_case_or_separators_are_said(tmp_path):
    """`Circle/` and `circle/`, `Square/` and `square_/` (folders a Mac or Windows would have
    merged, or two contributors' names for one class) were trained as four classes without a
    word: on drawn shapes, accuracy 0.615 against 0.963 with each pair merged. The log warns
    and the model card says so, naming them; names merely alike are left alone."""
    from petalflow.tasks.dataset import alike_class_names, alike_names_note

    classes = ["Circle", "Square", "Triangle", "circle", "square_", "sun flowers",
               "Sun-Flowers", "sunflower"]
    assert alike_class_names(classes) == [["Circle", "circle"], ["Square", "square_"],
                                          ["Sun-Flowers", "sun flowers"]]
    assert alike_names_note(classes) == (
        "class folders whose names differ only in case, spaces, '_' or '-' (Circle, circle; "
        "Square, square_; Sun-Flowers, sun flowers) are trained as different classes, and the "
        "model must tell them apart: if each group is one class, put its images in one folder")
    assert alike_names_note(["cat", "cats", "dog"]) is None
    many = [name for i in range(7) for name in (f"c{i}", f"C{i}")]
    assert alike_names_note(many).split("(")[1].startswith(
        "C0, c0; C1, c1; C2, c2; C3, c3; C4, c4; 2 more)")
    # A scanned dataset's model card says so.
    from petalflow.tasks.dataset import dataset_summary

    root = make_dataset(tmp_path / "d", per_class=6)
    for i in range(6):  # another contributor's blue photos
        write_image(root / "Blue" / f"IMG_{i}.jpg", COLOURS["blue"], seed=900 + i)
    info = prepare_dataset(root, tmp_path / "m", 0.2, 0.2, seed=0)
    card = _card(info, dataset_summary(info), tmp_path)
    assert ("Class folders whose names differ only in case, spaces, '_' or '-' (Blue, blue) "
            "are trained as different classes") in card



def test_two_exports_of_one_dataset_given_together_are_named_as_such(tmp_path):
    """An archive of two exports of one dataset (`export 2025-11/Circle/…` and
    `export 2025-12/Circle/…`, the later one holding the earlier's photos and more): the
    export folders are the classes, the earlier one's photos all lie in the later one too, so
    they are quarantined and one class is left. The error said only that (and its hint spoke
    of formats TensorFlow cannot decode); it now names the shared subfolders and what to give."""
    import shutil

    from petalflow.flows.cli import EXIT_DATA, explain_failure
    from petalflow.tasks.errors import UnusableImages

    root = tmp_path / "data"
    make_dataset(root / "export 2025-11", per_class=6)
    shutil.copytree(root / "export 2025-11", root / "export 2025-12")
    for name, rgb in COLOURS.items():  # and new photos beside them
        for i in range(3):
            write_image(root / "export 2025-12" / name / f"new_{i}.jpg", rgb, seed=500 + i)
    with pytest.raises(UnusableImages) as refused:
        prepare_dataset(root, tmp_path / "m", 0.2, 0.2, seed=0)
    message = str(refused.value)
    assert message.startswith("need at least 2 classes with usable images, found 1 (export "
                              "2025-12): the 18 image files in export 2025-11 were quarantined: "
                              "same image found under labels export 2025-11, export 2025-12")
    assert message.endswith(
        "; export 2025-11, export 2025-12 hold the same subfolders (blue, green, red): copies "
        "or exports of one dataset, whose classes are those subfolders? Give one of them as "
        "the dataset (its folder, or an archive of it alone)")
    said = explain_failure(refused.value)
    assert said.code == EXIT_DATA and said.hint.startswith("a photo has one label")
    # The same photos in two class folders of a plain dataset: no such sentence.
    plain = make_dataset(tmp_path / "plain", per_class=6)
    shutil.rmtree(plain / "green")
    shutil.rmtree(plain / "blue")
    shutil.copytree(plain / "red", plain / "rouge")
    with pytest.raises(UnusableImages) as refused:
        prepare_dataset(plain, tmp_path / "m2", 0.2, 0.2, seed=0)
    assert "hold the same subfolders" not in str(refused.value)


def test_each_split_is_an_mlflow_dataset_input_named_after_the_source(tmp_path):
    """MLflow's "Datasets used" of a training run: a split's digest follows its images and
    labels (a renamed file is the same data, a relabelled one is not), its source is the URL
    as recorded, without credentials, or the path."""
    from petalflow.tasks.registry import dataset_name, split_inputs

    assert [dataset_name(u) for u in (
        "https://h/x/flower_photos.tgz", "https://h/api/download?id=3", "photos/",
        "file:///data/my%20photos.tar.gz", "/data/set.zip", ".zip")] == [
        "flower_photos", "download", "photos", "my photos", "set", ".zip"]
    assert dataset_name("https://h/" + "x" * 400 + ".zip") == "x" * 250
    info = prepare_dataset(make_dataset(tmp_path / "d", per_class=10), tmp_path / "m",
                           0.2, 0.2, 0)

    def described(manifest_path, url):
        found = {}
        for item in split_inputs({**info, "manifest": str(manifest_path)}, url):
            (tag,) = item.tags
            assert tag.key == "mlflow.data.context"
            found[tag.value] = item.dataset
        return found

    first = described(info["manifest"], "https://alice:SECRET@h/d/photos.tgz?sig=SECRET2")
    assert sorted(first) == ["test", "training", "validation"]
    assert {json.loads(d.source)["url"] for d in first.values()} == {
        "https://***@h/d/photos.tgz?sig=***"}
    assert [json.loads(first[c].profile)["num_rows"] for c in ("training", "validation",
                                                               "test")] == [
        info["counts"]["splits"][s] for s in ("train", "val", "test")]
    manifest = load_manifest(Path(info["manifest"]))
    renamed, relabelled = tmp_path / "renamed.csv", tmp_path / "relabelled.csv"
    manifest.assign(path="x/" + manifest["path"]).to_csv(renamed, index=False)
    test_row = manifest.index[manifest["split"] == "test"][0]
    manifest.loc[test_row, "label"] = "other"
    manifest.to_csv(relabelled, index=False)
    local = described(renamed, "photos")
    assert {json.loads(d.source)["uri"] for d in local.values()} == {"photos"}
    assert {c: d.digest for c, d in local.items()} == {c: d.digest for c, d in first.items()}
    changed = described(relabelled, "photos")
    assert changed["test"].digest != first["test"].digest
    assert changed["training"].digest == first["training"].digest

"""Scan a folder-per-class dataset into a manifest, quarantine what cannot be read, split it.

The manifest is a pandas DataFrame with one row per file found under a class folder:
``path`` (relative, POSIX), ``label`` (class folder name), ``sha256``, ``size`` (bytes), ``width``,
``height`` (decoded pixels, 0 when quarantined), ``status`` (``ok`` or ``quarantined``),
``reason`` (why it was quarantined, empty when ok) and, after ``split_dataset``, ``split``
(``train``/``val``/``test``, empty for quarantined rows).

Class order is the sorted class folder names; it travels with the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pandas as pd
from prefect import task
from typing_extensions import NotRequired, TypedDict  # pydantic needs them before 3.12

from petalflow.tasks.common import (
    counted, imports_settled, log, printable_name, system_folder, walk_files,
    without_autotuning, write_json,
)
from petalflow.tasks.errors import DatasetError, UnusableImages
from petalflow.tasks.space import disk_full_said
from petalflow.tasks.images import IMAGE_SUFFIXES, SUPPORTED_FORMATS
# Larger images are quarantined: decoding one would take gigabytes (the served model's limit).
from petalflow.tasks.serving import (MAX_PIXELS, TAIL_BYTES, text_start, unsupported_format,
                                     web_page, why_undecodable)


class DatasetCounts(TypedDict):
    """How many files the scan found, used and quarantined (and why), per split."""

    found: int
    used: int
    quarantined: int
    classes: list[str]
    splits: dict[str, int]
    # Usable JPEGs whose EXIF Orientation says they are displayed turned (phone photos): the
    # decoder turns them upright (images.upright_images); and those whose EXIF PIL could not
    # read. Both 0: training need not read any EXIF.
    turned: int
    exif_unreadable: int
    # Relative path -> reason of at most SHOWN_REASONS quarantined files, every kind of reason
    # among them (``shown_reasons``; the manifest has every file's). This description crosses
    # to the training flow as its parameter (stored by Prefect's API, shown in its UI) and
    # into the summary: per-file data here grew them with the data (a photo export holds a
    # metadata file per photo). Descriptions earlier versions wrote hold every file's.
    quarantine_reasons: dict[str, str]
    # How many files each kind of reason quarantined (``reason_kind``), most first. Not in the
    # descriptions earlier versions wrote (``reasons_by_kind`` counts those).
    quarantined_by_reason: NotRequired[dict[str, int]]
    empty_class_folders: list[str]  # folders without a single image: skipped, reported
    # A dataset delivered already split (train/, test/, ... each holding the class folders): the
    # split folders whose class folders were merged, and those without class folders (unused).
    split_folders: list[str]
    unlabeled_split_folders: list[str]
    # Copies of the class folders nested in the dataset (flowers/flowers/): see nested_copies.
    nested_copies: list[str]
    # Images lying in the dataset folder itself, outside every class folder: not used (nothing
    # says what they show), counted and named (the first few) so the loss is seen. Not in the
    # descriptions earlier versions wrote (a reused scan gets them from its folder).
    loose_images: NotRequired[int]
    loose_image_examples: NotRequired[list[str]]
    # When every class's images lie in subfolders of its folder (a folder of datasets given as
    # the dataset has that shape): (class folder, subfolder count, the first few) of the first
    # few classes (classes_of_subfolders). Not in descriptions earlier versions wrote.
    classes_of_subfolders: NotRequired[list[tuple[str, int, list[str]]]]
    # Classes whose images all lie in one subfolder of their folder while other classes hold
    # theirs directly (photos/more/tulips/ beside photos/roses/): (class folder, subfolder) of
    # the first few (classes_in_one_subfolder). Not in descriptions earlier versions wrote.
    classes_in_one_subfolder: NotRequired[list[tuple[str, str]]]


class DatasetInfo(TypedDict):
    """The dataset description every later stage reads (also ``dataset.json``): where the data
    and its manifest are, the class names in model order, the fingerprint and the counts."""

    data_root: str
    manifest: str
    classes: list[str]
    fingerprint: str
    counts: DatasetCounts


SHOWN_REASONS = 20  # quarantined files named in the summary and the model card


def dataset_summary(info: DatasetInfo) -> dict:
    """What the run's summary and model card say about the data (no paths): the count of
    quarantined files per kind of reason and at most ``SHOWN_REASONS`` of them by name (a
    photo export holds a metadata file per photo: listing each made the printed summary as
    long as the dataset; the manifest keeps every file's reason)."""
    counts = info["counts"]
    return {"fingerprint": info["fingerprint"], "classes": info["classes"],
            **{k: counts[k] for k in ("found", "used", "quarantined", "splits",
                                      "empty_class_folders")},
            "quarantined_by_reason": reasons_by_kind(counts),
            "quarantine_reasons": shown_reasons(counts["quarantine_reasons"]),
            **{k: counts.get(k, []) for k in ("split_folders", "unlabeled_split_folders",
                                              "nested_copies", "loose_image_examples",
                                              "classes_of_subfolders",
                                              "classes_in_one_subfolder")},
            "loose_images": counts.get("loose_images", 0)}


# orientation: a JPEG's EXIF Orientation 1-8 as PIL reads it (1: as stored, or none; 0: EXIF
# that cannot be read; images.py turns them).
MANIFEST_COLUMNS = ["path", "label", "sha256", "size", "width", "height", "orientation",
                    "status", "reason"]
MIN_PER_SPLIT = 1
COPY_OF = "copy of "  # the reason of a file in a nested copy of the class folders (scan_dataset)
SAME_IMAGE = "same image found under labels "  # the reason of bytes found in two classes
NOT_A_PHOTO = "not a photo: "  # the reason of a file kept beside photos (companion_file)
# The reason of a file in a format the scan names (by PIL, or by its bytes as the served model
# names it) that TensorFlow cannot decode.
UNSUPPORTED_FORMAT = f"unsupported image format {{}} (supported: {', '.join(SUPPORTED_FORMATS)})"


def reason_kind(reason: str) -> str:
    """A quarantine reason without its file's details, to count files by ("undecodable image:
    JPEG cut short ..." -> "undecodable image"; "copy of red/003.jpg" -> "copy of a file of
    the same class"; "not a photo: a video (.mov)" -> "not a photo: a video")."""
    if reason.startswith(COPY_OF):
        return "copy of a file of the same class"
    if reason.startswith(SAME_IMAGE):
        return "same image found under two labels"
    if reason.startswith(NOT_A_PHOTO):
        return reason.split(" (")[0]
    return reason.split(":")[0].split("(")[0].strip()


def count_by_kind(reasons: dict[str, str]) -> dict[str, int]:
    """Files per kind of reason (``reason_kind``) of ``reasons`` (path -> reason), most first."""
    tally: dict[str, int] = {}
    for reason in reasons.values():
        tally[reason_kind(reason)] = tally.get(reason_kind(reason), 0) + 1
    return dict(sorted(tally.items(), key=lambda item: (-item[1], item[0])))


def reasons_by_kind(counts: dict) -> dict[str, int]:
    """Quarantined files per kind of reason, most first (the counts' own, or counted from
    every file's reason for a description an earlier version wrote)."""
    if "quarantined_by_reason" in counts:
        return dict(counts["quarantined_by_reason"])
    return count_by_kind(counts.get("quarantine_reasons", {}))


def shown_reasons(reasons: dict[str, str], limit: int = SHOWN_REASONS) -> dict[str, str]:
    """At most ``limit`` of the quarantined files (path -> reason), sorted by path, taken in
    turn from each kind of reason, so a broken photo is named beside a thousand sidecars."""
    if len(reasons) <= limit:
        return dict(reasons)
    by_kind: dict[str, list[str]] = {}
    for path in sorted(reasons):
        by_kind.setdefault(reason_kind(reasons[path]), []).append(path)
    chosen: list[str] = []
    for depth in range(limit):
        for paths in by_kind.values():
            if depth < len(paths) and len(chosen) < limit:
                chosen.append(paths[depth])
        if len(chosen) >= limit:
            break
    return {path: reasons[path] for path in sorted(chosen)}


# Kinds of reason that name the file ("hidden file", "undecodable image"): counted in the
# plural. The others read as what the files are ("not a photo: a video", "unsupported image
# format TIFF") and keep their words.
_COUNTABLE_KIND = re.compile(r"^(hidden|empty|undecodable|unreadable) [a-z ]+$")


def kind_counted(n: int, kind: str) -> str:
    """``n`` files of a kind of quarantine reason: "2 hidden files", "1 empty file", "3
    copies of a file of the same class", "21 not a photo: photo metadata"."""
    if _COUNTABLE_KIND.match(kind):
        return counted(n, kind)
    if kind.startswith("copy of ") and n != 1:
        return f"{n} copies of {kind[len('copy of '):]}"
    return f"{n} {kind}"


def dataset_line(info: DatasetInfo, kinds: int = 3) -> str:
    """The log's line about the data: classes, files found, used and quarantined, and what
    the quarantined files were (the ``kinds`` commonest reasons)."""
    counts = info["counts"]
    line = (f"dataset: {len(info['classes'])} classes, {counts['found']} files found, "
            f"{counts['used']} used, {counts['quarantined']} quarantined")
    tally = list(reasons_by_kind(counts).items())
    if not tally:
        return line
    parts = [kind_counted(n, kind) for kind, n in tally[:kinds]]
    rest = tally[kinds:]
    if rest:
        parts.append(f"{sum(n for _, n in rest)} more, for "
                     f"{counted(len(rest), 'other reason')}: the model card lists them")
    return f"{line} ({'; '.join(parts)})"


def _sha256_bytes(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


HASHES_FILE = "file_hashes.csv"  # prepare_dataset's record of FileHashes, beside the manifest
# A file changed less than this before a scan is not recorded (hashed again next time): a write
# right after the scan read it can keep its timestamps where they are coarse (FAT: 2 s).
RACY_NS = 3_000_000_000


class FileHashes:
    """Each file's sha256, read again only when the file may have changed: an earlier scan of
    the same folder recorded (size, modification time, change time, inode) beside each digest,
    and a file whose four are the same is not read. A folder source (scheduled retraining on a
    folder the data grows in) then reads only its new and changed files, not every byte of it
    on every run. The change time cannot be set by tools that copy times (``cp -p``, rsync,
    ``touch -d``); a file changed within ``RACY_NS`` of a scan is not recorded by it."""

    def __init__(self, earlier: Optional[dict] = None):
        self.earlier = earlier or {}  # relative path -> ((size, mtime, ctime, inode), sha256)
        self.recorded: dict = {}
        self.read = 0  # files whose bytes were read
        self._started_ns = time.time_ns()

    def sha256(self, path: Path, rel: str) -> tuple[str, int]:
        """``rel``'s sha256 and size (``path`` its file). Raises OSError as reading does."""
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        seen = self.earlier.get(rel)
        if seen is not None and seen[0] == key:
            sha, size = seen[1], st.st_size
        else:
            sha, size = _sha256_bytes(path)
            self.read += 1
        if max(st.st_mtime_ns, st.st_ctime_ns) < self._started_ns - RACY_NS:
            self.recorded[rel] = (key, sha)
        return sha, size

    def write(self, path: Path) -> None:
        rows = [(rel, *key, sha) for rel, (key, sha) in self.recorded.items()]
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        pd.DataFrame(rows, columns=["path", "size", "mtime_ns", "ctime_ns", "inode", "sha256"]
                     ).to_csv(tmp, index=False)
        os.replace(tmp, path)


def earlier_hashes(manifests_dir: Path, data_root: Path) -> dict:
    """What earlier scans of ``data_root`` (this folder, under any split settings) recorded
    as ``FileHashes``: relative path -> ((size, mtime, ctime, inode), sha256)."""
    root, found = str(Path(data_root).resolve()), {}
    for folder, written in _descriptions(manifests_dir):
        if written.get("data_root") != root:
            continue
        try:
            rows = pd.read_csv(folder / HASHES_FILE, keep_default_na=False,
                               dtype={"path": str, "sha256": str})
            found.update(
                (row[0], ((int(row[1]), int(row[2]), int(row[3]), int(row[4])), row[5]))
                for row in rows[["path", "size", "mtime_ns", "ctime_ns", "inode", "sha256"]]
                .itertuples(index=False))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def is_class_folder(path: Path) -> bool:
    """A visible folder that is not archiver or system metadata."""
    return path.is_dir() and not path.name.startswith(".") and not system_folder(path.name)


def class_folders(data_root: Path) -> list[str]:
    """Sorted names of the candidate class folders directly under ``data_root``."""
    return sorted(p.name for p in Path(data_root).iterdir() if is_class_folder(p))


def find_data_root(folder: Path) -> Path:
    """Descend wrapper folders (``flower_photos/``) to the folder that holds the class folders.

    A folder is a wrapper when it has exactly one class-like subfolder and no other visible entry
    except plain text files (LICENSE.txt, README); hidden entries and archiver metadata
    (``__MACOSX/``) do not count. So is one whose only subfolder holding images holds the
    class folders, beside folders and files of no image (Food-101's ``images/`` beside
    ``meta/``, Stanford Dogs' ``Images/`` beside ``Annotation/``, Animals-10's ``raw-img/``
    beside ``translate.py``).
    """
    folder = Path(folder)
    while True:
        visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
        subdirs = [p for p in visible if is_class_folder(p)]
        others = [p for p in visible if not p.is_dir() and p.suffix.lower() not in {".txt", ".md"}]
        if len(subdirs) == 1 and not others:
            folder = subdirs[0]
            continue
        inner = _only_part_with_classes(subdirs, others)
        if inner is None:
            return folder
        folder = inner


def _only_part_with_classes(subdirs: list[Path], others: list[Path]) -> Optional[Path]:
    """The one folder of ``subdirs`` that holds images, when the others hold none, no image
    lies beside them (``others``: Animals-10's translate.py, a labels.csv) and it holds two
    or more folders with images (the classes); else None."""
    if not subdirs or any(p.suffix.lower() in IMAGE_SUFFIXES for p in others):
        return None
    with_images = []
    for sub in subdirs:
        if _holds_an_image(sub):
            with_images.append(sub)
            if len(with_images) > 1:  # the classes themselves, as a rule
                return None
    if not with_images:
        return None
    inner = with_images[0]
    classes = 0
    for sub in inner.iterdir():
        if is_class_folder(sub) and _holds_an_image(sub):
            classes += 1
            if classes == 2:
                return inner
    return None


def _named_image_folders(data_root: Path, named: Callable[[str], bool]) -> Optional[list[str]]:
    """The folders in ``data_root`` that hold images, when each of them is ``named`` (folders
    of no image, such as docs/ or papers/, and copies of the others left out); else None.
    Names are tested before folders are walked: a dataset of classes costs the walk of its
    first folder (to its first image) and a look at that folder's first entry."""
    data_root = Path(data_root)
    names = class_folders(data_root)

    def counts(name: str) -> bool:
        return _holds_an_image(data_root / name) \
            and _copy_inside(data_root / name, set(names) - {name}) is None

    if any(not named(n) and counts(n) for n in names):
        return None
    return [n for n in names if named(n) and counts(n)]


def _holds_an_image(folder: Path) -> bool:
    """Whether a file named as an image lies anywhere below ``folder`` (stops at the first)."""
    for _dirpath, names in walk_files(folder):
        if any(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in names):
            return True
    return False


# Words that name the folders of a dataset delivered already split, as a whole folder name or
# one of its words: train/, Testing/, seg_train/, training_set/, seg_pred/ (unlabeled), ...
SPLIT_WORDS = frozenset({"train", "training", "val", "valid", "validation", "dev", "test",
                         "testing", "eval", "evaluation", "pred", "predict", "prediction",
                         "holdout", "unlabeled", "unlabelled"})
TRAINING_WORDS = frozenset({"train", "training"})


def _words(name: str) -> set[str]:
    """The words of a folder name, digits dropped: seg_train -> seg, train; test1, val2017 ->
    test, val."""
    return {w for w in re.split(r"[^a-z]+", name.lower()) if w}


def split_folders(data_root: Path) -> tuple[list[str], list[str]]:
    """(split folders holding class folders, split folders without any) when ``data_root`` is
    a dataset delivered already split: every folder in it that holds images is named like a
    split (Fruits-360's papers/ of PDFs beside them does not count) and one of them, holding
    class folders (possibly inside a wrapper folder: ``training_set/training_set/cat``), like
    a training split; a copy of the split folders among them (Kaggle's chest X-rays:
    chest_xray/chest_xray/train/...) is none of them. Otherwise ([], []): its folders are the
    classes."""
    data_root = Path(data_root)
    names = _named_image_folders(data_root, lambda n: bool(_words(n) & SPLIT_WORDS))
    if not names:
        return [], []
    labelled = [n for n in names if class_folders(find_data_root(data_root / n))]
    if not any(_words(n) & TRAINING_WORDS for n in labelled):
        return [], []
    return labelled, [n for n in names if n not in labelled]


# Words that may stand beside a split's name in its folder's: training_set/, test_images/.
_SPLIT_NAME_FILLERS = frozenset({"set", "data", "dataset", "images", "imgs", "img", "photos",
                                 "pics", "files", "split"})


def _only_split_words(name: str) -> bool:
    """Whether a folder name says nothing but a split (train/, test1/, val2017/, test_set/);
    "training shoes" or "test tubes" say more."""
    words = _words(name) - _SPLIT_NAME_FILLERS
    return bool(words) and words <= SPLIT_WORDS


# Folder names of the parts of a dataset that keeps its labels elsewhere: the Oxford-IIIT Pet
# archives (images/, annotations/), Pascal VOC (JPEGImages/, Annotations/, ImageSets/, ...).
PART_NAMES = frozenset({
    "images", "image", "imgs", "img", "jpg", "jpeg", "png", "photos", "pictures", "pics",
    "annotations", "annotation", "masks", "mask", "labels", "label", "trimaps", "trimap",
    "segmentations", "segmentation", "xmls", "xml", "bboxes", "boxes", "jpegimages",
    "imagesets", "segmentationclass", "segmentationobject"})


def folders_not_classes_problem(data_root: Path) -> Optional[str]:
    """What is wrong when the folders in ``data_root`` are no classes: every one named as
    nothing but a split, one of them for training, and none named for training holds class
    folders (Kaggle's ``train/`` and ``test1/``), or every one named like a part of a dataset
    (``images/`` and ``annotations/``). A model telling those folders apart is what would be
    trained. Names them, and where the labels seem to be (the images' file names, a table
    beside them); None for any other layout."""
    data_root = Path(data_root)
    if (names := _named_image_folders(data_root, _only_split_words)) and len(names) > 1 \
            and any(_words(n) & TRAINING_WORDS for n in names) \
            and not split_folders(data_root)[0]:
        problem = (f"{', '.join(f'{n}/' for n in names)} are named like the splits of a "
                   "dataset, not like classes, and no training split among them holds class "
                   "folders")
        main = next(n for n in names if _words(n) & TRAINING_WORDS)
    elif (names := _named_image_folders(data_root, lambda n: n.lower() in PART_NAMES)) \
            and len(names) > 1:
        problem = (f"{', '.join(f'{n}/' for n in names)} are named like the parts of a "
                   "dataset (its images, annotations, masks), not like classes")
        main = max(names, key=lambda n: (len(loose_images(data_root / n)), n == "images"))
    else:
        return None
    problem += ": petalflow takes each image's class from the folder it is in"
    images = loose_images(data_root / main)
    labelled = labels_in_names(images)
    if labelled:
        examples = ", ".join(f"{name}: {label}" for label, name in labelled[:3])
        return (f"{problem}. The file names in {main}/ begin with a label ({examples}): "
                f"move each image into a folder named after it ({main}/{labelled[0][0]}/, "
                f"...) and train on {main}/")
    table = labels_file_hint(data_root, set(images))
    if table:
        return f"{problem}. {table}"
    return (f"{problem}: sort the images into one folder per class (e.g. {main}/cats/, "
            f"{main}/dogs/) and train on {main}/ (or, if these folders are your classes, name "
            "them otherwise)")


# A label at the start of a file name, then a number: cat.0.jpg, dog_12.png, Golden Retriever 3.jpg
_LABELLED_NAME = re.compile(r"^([A-Za-z]+(?:[ _-][A-Za-z]+)*)[ ._-]*\d+\.[A-Za-z0-9]+$")


def labels_in_names(names: list[str]) -> list[tuple[str, str]]:
    """When the file ``names`` carry their label as a prefix (cat.0.jpg, dog_12.png; at least 2
    labels, 80 % of the names): each label with its first file name, in order; else []."""
    examples: dict[str, str] = {}
    matched = 0
    for name in names:
        m = _LABELLED_NAME.match(name)
        if m:
            matched += 1
            examples.setdefault(m[1].lower(), name)
    if len(examples) < 2 or matched < 0.8 * len(names):
        return []
    return list(examples.items())


def nested_copies(parent: Path) -> dict[str, Path]:
    """The folders among ``parent``'s class folders that hold the class folders again, a copy
    of the dataset inside it (``flowers/flowers/daisy`` beside ``flowers/daisy``): name -> the
    folder of its class folders (wrappers descended). Such a folder holds two or more folders, each named
    like one of its sibling classes, and no file but notes (.txt, .md)."""
    names = set(class_folders(parent))
    copies = {name: inner for name in sorted(names)
              if (inner := _copy_inside(Path(parent) / name, names - {name})) is not None}
    return copies


def _copy_inside(folder: Path, siblings: set[str]) -> Optional[Path]:
    """The folder (wrappers descended) in which ``folder`` holds two or more folders named
    like its ``siblings``, and no file but notes: a copy of them; else None."""
    inner = folder
    while (dirs := _only_folders(inner)) is not None:
        if len(dirs) == 1:  # a wrapper
            inner = inner / dirs[0]
            continue
        return inner if len(dirs) >= 2 and set(dirs) <= siblings else None
    return None


def _only_folders(folder: Path) -> Optional[list[str]]:
    """The visible folders in ``folder`` when it holds no file but notes, else None: a class
    folder of images costs its first directory entries, no stat per file."""
    dirs = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or system_folder(entry.name):
                    continue
                if entry.is_dir():
                    dirs.append(entry.name)
                elif Path(entry.name).suffix.lower() not in {".txt", ".md"}:
                    return None
    except OSError:  # unreadable: a class folder as before (its files are reported)
        return None
    return dirs


def _class_parents(data_root: Path) -> list[tuple[Path, list[str], bool]]:
    """The folders whose subfolders are the classes, each with those subfolders' names and
    whether it is a copy: the split folders' (wrappers descended) for a dataset delivered
    already split, else ``data_root`` itself; and the copies of the class folders nested
    among those (``nested_copies``; the folder holding a copy is no class)."""
    data_root = Path(data_root)
    splits = split_folders(data_root)[0]
    tops = [find_data_root(data_root / s) for s in splits] or [data_root]
    parents = []
    for top in tops:
        copies = nested_copies(top)
        parents.append((top, [n for n in class_folders(top) if n not in copies], False))
        parents += [(inner, class_folders(inner), True) for inner in copies.values()]
    if splits:  # a copy of the split folders: each of its splits' class folders, as copies
        for inner in nested_copies(data_root).values():
            parents += [(find_data_root(inner / s), class_folders(find_data_root(inner / s)),
                         True) for s in splits if (inner / s).is_dir()]
    return parents


def orientation_note(counts: dict) -> Optional[str]:
    """One sentence for the log when some photos are stored turned (EXIF Orientation)."""
    turned = counts.get("turned") or 0
    if not turned:
        return None
    return (f"{counted(turned, 'photo')} stored turned (EXIF Orientation, as "
            "phones store portrait photos): decoded upright, in training as in serving")


def split_layout_note(counts: dict) -> Optional[str]:
    """One sentence for the log and the run report when the dataset came already split, holds
    a copy of its class folders, or has images outside every class folder."""
    notes = []
    loose = counts.get("loose_images") or 0
    if loose:
        examples = counts.get("loose_image_examples") or []
        notes.append(f"{loose} image{'s lie' if loose > 1 else ' lies'} in the dataset folder "
                     f"itself, outside every class folder, and {'are' if loose > 1 else 'is'} "
                     f"not used (e.g. {', '.join(examples[:3])}): move "
                     f"{'each' if loose > 1 else 'it'} into its class's folder")
    merged = counts.get("split_folders") or []
    if merged:
        notes.append(f"the dataset comes already split ({', '.join(f'{s}/' for s in merged)}): "
                     "each class is its folders in all of them, split again by petalflow")
    unlabeled = counts.get("unlabeled_split_folders") or []
    if unlabeled:
        notes.append(f"{', '.join(f'{s}/' for s in unlabeled)} holds no class folders "
                     "(unlabeled images) and is not used")
    nested = counts.get("classes_of_subfolders") or []
    if nested:
        shown = "; ".join(f"{name}/: {count}, {', '.join(f'{s}/' for s in examples)}"
                          f"{', …' if count > len(examples) else ''}"
                          for name, count, examples in nested)
        more = len(counts.get("classes") or nested) - len(nested)
        notes.append(f"every class's images lie in subfolders of its folder ({shown}"
                     f"{f'; {more} more' if more > 0 else ''}): each class is trained as one, "
                     "its subfolders merged; if the subfolders are the classes, give one of "
                     "these folders as the dataset")
    copies = counts.get("nested_copies") or []
    if copies:
        again = reasons_by_kind(counts).get(reason_kind(COPY_OF), 0)
        notes.append(f"{', '.join(f'{s}/' for s in copies)} "
                     f"{'holds' if len(copies) == 1 else 'hold'} the class folders again (a "
                     "copy of the dataset inside it): its files count for the classes their "
                     f"folders are named after, and the {again} with the bytes of a file of the "
                     "same class outside it are quarantined as copies")
    return "; ".join(notes) or None


def alike_class_names(classes: list[str]) -> list[list[str]]:
    """Groups of class names that differ only in case, spaces, '_' or '-' (``Cat`` and
    ``cat``, ``sun_flowers`` and ``Sunflowers``): folders that a case-insensitive system (a
    Mac, Windows) would have merged, or two contributors' names for one class; each is trained
    as a class of its own."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(re.sub(r"[\s_\-]+", "", name.casefold()), []).append(name)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]


def alike_names_note(classes: list[str], shown: int = 5) -> Optional[str]:
    """One sentence for the log (a warning) and the model card when some classes' names are
    alike (``alike_class_names``); else None."""
    alike = alike_class_names(classes)
    if not alike:
        return None
    named = "; ".join(", ".join(group) for group in alike[:shown])
    more = f"; {len(alike) - shown} more" if len(alike) > shown else ""
    return (f"class folders whose names differ only in case, spaces, '_' or '-' ({named}{more}) "
            "are trained as different classes, and the model must tell them apart: if each "
            "group is one class, put its images in one folder")


NESTED_SHOWN = (6, 3)  # classes, and subfolders of each, named in the note


def subfolders_by_class(manifest: pd.DataFrame) -> dict[str, set[Optional[str]]]:
    """For each class folder of the manifest's used images, the subfolders of it they lie in
    (None for those in the folder itself)."""
    used = manifest.loc[manifest["status"] == "ok", "path"].astype(str).str.split("/")
    inner: dict[str, set[Optional[str]]] = {}
    for parts in used:
        inner.setdefault(parts[0], set()).add(parts[1] if len(parts) > 2 else None)
    return inner


def classes_of_subfolders(folders: dict[str, set[Optional[str]]]
                          ) -> list[tuple[str, int, list[str]]]:
    """(class folder, its subfolders holding images, the first ``NESTED_SHOWN[1]``) of the
    first ``NESTED_SHOWN[0]`` classes when every class (2 or more) has its used images in 2 or
    more subfolders of its folder and none in the folder itself: a folder of datasets given as
    the dataset (data/flowers/daisy/…, data/pets/cat/…) has that shape, and so has a dataset
    whose every class is organised in subfolders (by date, by breed). Else [].
    ``folders``: ``subfolders_by_class`` of the manifest."""
    if len(folders) < 2 or any(None in subs or len(subs) < 2 for subs in folders.values()):
        return []
    return [(name, len(subs), sorted(subs)[:NESTED_SHOWN[1]])
            for name, subs in sorted(folders.items())[:NESTED_SHOWN[0]]]


def classes_in_one_subfolder(inner: dict[str, set[Optional[str]]]) -> list[tuple[str, str]]:
    """(class folder, its one subfolder) of the first ``NESTED_SHOWN[0]`` classes whose used
    images all lie in one subfolder of their folder, when another class holds its images in
    its folder itself: class folders at mixed depths (photos/roses/ beside photos/more/tulips/,
    a folder dropped into another, a download extracted into a folder of its own), whose class
    is named after the outer folder ("more"), as Keras' ``image_dataset_from_directory`` names
    it. Classes that each keep their images in a subfolder (cats/images/) are not this.
    ``inner``: ``subfolders_by_class`` of the manifest."""
    if not any(None in subs for subs in inner.values()):
        return []
    return [(name, next(iter(subs))) for name, subs in sorted(inner.items())
            if len(subs) == 1 and None not in subs][:NESTED_SHOWN[0]]


def tucked_classes_note(counts: dict) -> Optional[str]:
    """One sentence for the log (a warning) and the model card naming the classes of
    ``classes_in_one_subfolder``; else None."""
    tucked = counts.get("classes_in_one_subfolder") or []
    if not tucked:
        return None
    if len(tucked) == 1:
        (name, inner), = tucked
        return (f"{name}/ holds its images only in its subfolder {inner}/, while the other "
                f"classes hold theirs in their own folders: it is trained as the class "
                f"\"{class_label(name)}\"; if {inner} is the class, move {inner}/ up beside the "
                "other class folders")
    named = ", ".join(f"{name}/ only in {inner}/" for name, inner in tucked)
    return (f"{len(tucked)} class folders hold their images only in one subfolder ({named}), "
            "while other classes hold theirs in their own folders: each is trained as the "
            "class its outer folder names; if the subfolders are the classes, move them up "
            "beside the other class folders")


def loose_images(data_root: Path) -> list[str]:
    """Sorted names of the image files lying directly in ``data_root`` (named as images,
    visible): no class folder says what they show, so they are not used, and reported."""
    return sorted(p.name for p in Path(data_root).iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


# A table that labels images (Kaggle's train.csv, labels.txt, annotations.json) names them.
LABEL_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl")
_LABEL_TABLE_BYTES = 1 << 20  # the part of such a file read to see whether it names images


def labels_file_hint(data_root: Path, names: set[str]) -> Optional[str]:
    """For a dataset whose labels are in a table instead of its folders (``images/`` beside
    ``labels.csv``): which file, how many of the image file ``names`` it names, and what to
    do; None when no file in ``data_root`` or one folder below names at least five of them
    (or all of them, when fewer)."""
    stems = {Path(n).stem for n in names}
    if not names:
        return None
    need = min(5, len(names))
    data_root = Path(data_root)
    tables = [p for pattern in ("*", "*/*") for p in sorted(data_root.glob(pattern))
              if p.suffix.lower() in LABEL_TABLE_SUFFIXES and p.is_file()
              and not any(part.startswith(".") for part in p.relative_to(data_root).parts)]
    for table in tables:
        try:
            with open(table, "rb") as fh:
                text = fh.read(_LABEL_TABLE_BYTES).decode("utf-8", "replace")
        except OSError:
            continue
        tokens = set(re.split(r"[\s,;\t\"'/\\:\[\]{}]+", text))
        named = len(tokens & names) or len(tokens & stems)
        if named >= need:
            return (f"{table.relative_to(data_root).as_posix()} looks like the labels (it names "
                    f"{named}{'+' if table.stat().st_size > _LABEL_TABLE_BYTES else ''} of the "
                    f"{len(names)} images), but petalflow takes each image's class from the "
                    "folder it is in: move the images into one folder per class (e.g. "
                    "cats/, dogs/) and train on that")
    return None


def labels_elsewhere(data_root: Path, manifest: pd.DataFrame,
                     archive: bool = False) -> Optional[str]:
    """For a dataset without two class folders: where its labels seem to be instead, when
    images lie in its folder itself with a label at the start of their names (Kaggle's
    dogs-vs-cats train.zip: cat.0.jpg, dog.0.jpg) or a table names its images; or, images
    lying there without either, that it looks like one class's folder (``one_class_folder``;
    ``archive``: ``data_root`` is an archive's extraction); else None."""
    loose = loose_images(data_root)
    labelled = labels_in_names(loose)
    if labelled:
        shown = ", ".join(f"{name}: {label}" for label, name in labelled[:3])
        return (f"the {counted(len(loose), 'image')} {_lie(len(loose))} in the dataset "
                f"folder itself, and their file names begin with a label ({shown}): move each "
                f"image into a folder named after it "
                f"({', '.join(f'{label}/' for label, _ in labelled[:3])}"
                f"{', ...' if len(labelled) > 3 else ''})")
    return (labels_file_hint(data_root, {Path(p).name for p in manifest["path"]} | set(loose))
            or (one_class_folder(data_root, len(loose), archive) if loose else None))


def _lie(n: int) -> str:
    return "lies" if n == 1 else "lie"


def one_class_folder(data_root: Path, images: int, archive: bool = False) -> str:
    """For ``images`` lying in ``data_root`` itself without class folders (the path of one
    class's folder given as the dataset: flowers/roses; an archive of it): say so, naming
    the folder above when it holds folders of images (the class folders), as a local
    folder's parent does; of an archive, its folder's name and what to pack."""
    if archive:  # the extraction's own folder is named by the archive's digest
        name = Path(data_root).name
        where = ("at the archive's top level" if re.fullmatch(r"[0-9a-f]{64}", name)
                 else f"in the archive's {name}/ itself")
        return (f"the {counted(images, 'image')} {_lie(images)} {where}, with no class "
                "folder: an archive of one class's folder? Pack the folder that holds one "
                "subfolder per class (tar -czf dataset.tgz dataset/)")
    message = (f"the {counted(images, 'image')} {_lie(images)} in {data_root} itself, with "
               "no class folder: a folder of one class? Give the folder that holds one "
               "subfolder per class")
    parent = Path(data_root).parent
    try:
        classes = sorted(p.name for p in parent.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and loose_images(p))
    except OSError:
        return message
    if len(classes) < 2:
        return message
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return f"{message}: {parent} (it holds {len(classes)}: {shown})"


def class_label(folder_name: str) -> str:
    """The class a folder's name stands for: the name in Unicode's composed form (NFC). Zips
    made on macOS store "café" decomposed (e + a combining accent), names typed elsewhere
    composed: the same name to anyone reading it, and one class, not two that look alike."""
    return unicodedata.normalize("NFC", folder_name)


def candidate_classes(data_root: Path, parents: Optional[list] = None) -> list[str]:
    """Sorted names of the folders that could be classes: the class folders, or in a dataset
    delivered already split, the class folders of its split folders (merged by name,
    ``class_label``). ``parents``: ``_class_parents(data_root)`` when the caller has them."""
    parents = _class_parents(data_root) if parents is None else parents
    return sorted({class_label(name) for _parent, names, _copy in parents for name in names})


def copy_folders(data_root: Path, parents: Optional[list] = None) -> list[str]:
    """The copies of the class folders nested in ``data_root`` (``nested_copies``), as paths
    relative to it. ``parents``: ``_class_parents(data_root)`` when the caller has them."""
    data_root = Path(data_root)
    parents = _class_parents(data_root) if parents is None else parents
    return [parent.relative_to(data_root).as_posix() for parent, _names, copy in parents if copy]


def list_class_files(data_root: Path, parents: Optional[list] = None
                     ) -> tuple[list[str], list[tuple[str, str]]]:
    """Sorted class names and (relative path, label) of every file under each class folder.

    Files are found recursively (nested folders belong to their top class folder); files lying
    directly in ``data_root`` (LICENSE.txt, README) are not part of any class and are ignored.
    A dataset delivered already split (``split_folders``) has its class folders inside the split
    folders: a class's files are those of its folders in every split (petalflow splits again).
    A copy of the class folders nested in the dataset (``nested_copies``) is read the same way:
    its files belong to the classes its folders are named after.
    """
    data_root = Path(data_root)
    parents = _class_parents(data_root) if parents is None else parents
    files: list[tuple[str, str]] = []
    for parent, folders, _copy in parents:
        for folder in folders:
            label = class_label(folder)
            for dirpath, filenames in walk_files(parent / folder):
                for name in filenames:
                    rel = (Path(dirpath) / name).relative_to(data_root).as_posix()
                    files.append((rel, label))
    _refuse_undecodable_names([rel for rel, _label in files])
    return candidate_classes(data_root, parents), files


# Names of archives: opened inside a downloaded archive (``download._open_inner_archives``),
# named in the error for a folder source that holds them instead of class folders.
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")


def _refuse_a_folder_of_archives(data_root: Path) -> None:
    """A folder without class files that holds archives (the dataset's .tgz, one zip per
    class): say to extract them, instead of "found 0 classes"."""
    names = sorted(name for _, filenames in walk_files(data_root) for name in filenames
                   if name.lower().endswith(ARCHIVE_SUFFIXES) and not name.startswith("."))
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DatasetError(
            f"{data_root} holds archives ({shown}) and no folder of images: extract them "
            "there (archives are opened inside an archive given as --data-url, not in a "
            "folder)")


def _refuse_undecodable_names(paths: list[str]) -> None:
    """A folder on disk whose file or folder names are not UTF-8 (archives are decoded when
    extracted: ``download.tar_member_name``) cannot be described in a manifest, JSON or MLflow
    tags: say which, instead of failing later on an encoding error."""
    bad = [shown for rel in paths if (shown := printable_name(rel)) != rel]
    if bad:
        raise DatasetError(
            f"{len(bad)} file(s) have names that are not UTF-8, e.g. {', '.join(bad[:3])}: "
            "rename them (or pack the folder into a .tar/.zip archive, whose Latin-1/cp1252 "
            "names petalflow decodes)")


# Files that operating systems, photo exports, editors and phones keep beside photos (by name
# or suffix, compared case-blind): never photos, and quarantined as what they are, not as
# "not an image file" (a download gone wrong looks so).
COMPANION_NAMES = {
    "thumbs.db": "Windows' thumbnail cache (Thumbs.db)",
    "ehthumbs.db": "Windows Media Center's thumbnail cache (ehthumbs.db)",
    "desktop.ini": "Windows' folder settings (desktop.ini)",
    "zbthumbnail.info": "ACDSee's thumbnail cache (ZbThumbnail.info)",
}
COMPANION_SUFFIXES = {
    ".json": "photo metadata (.json, as Google Takeout writes beside each photo)",
    ".xmp": "an editor's metadata sidecar (.xmp)",
    ".aae": "Apple Photos' edit record (.aae)",
    **{suffix: f"a video ({suffix})" for suffix in (
        ".mov", ".mp4", ".m4v", ".3gp", ".avi", ".mkv", ".webm", ".mts", ".wmv")},
}


# Google Takeout's names: "<photo name>.json", "<photo name>.supplemental-metadata.json" (cut
# short to fit 51 characters: ".supplemental-met.json"), "<photo name>(1).json", and an
# album's "metadata.json"; a .json by another name is a JSON file of the dataset's own
# (labels.json, annotations.json), not said to be Takeout's.
_TAKEOUT_JSON = re.compile(
    r"\.(?:" + "|".join(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES | {
        ".heic", ".heif", ".mov", ".mp4"})) + r")(?:\(\d+\))?(?:\.[a-z-]*)?(?:\(\d+\))?\.json$")


def companion_file(name: str) -> Optional[str]:
    """"not a photo: <what it is>" for a file kept beside photos (``COMPANION_NAMES``,
    ``COMPANION_SUFFIXES``), else None."""
    name = name.lower()
    what = COMPANION_NAMES.get(name) or COMPANION_SUFFIXES.get(os.path.splitext(name)[1])
    takeouts = name == "metadata.json" or _TAKEOUT_JSON.search(name)
    if what and name.endswith(".json") and not takeouts:
        what = "a JSON file (.json)"
    return NOT_A_PHOTO + what if what else None


def _header_check(path: Path) -> tuple[Optional[str], int, int, int]:
    """(reason or None, width, height, EXIF orientation) from the file header alone, without
    decoding pixels. The orientation is PIL's reading of a JPEG's EXIF (1 for other formats or
    none): PIL reads every segment, the served graph's reader the first few
    (``images.exif_orientations``), so a dataset PIL finds nothing turned in has nothing the
    decoder would turn, and training skips reading EXIF for it (``reads_exif``)."""
    from PIL import Image, UnidentifiedImageError

    companion = companion_file(path.name)  # by its name: not opened
    if companion:
        return companion, 0, 0, 1
    # Only the header is read here and MAX_PIXELS (lower) is enforced below, so PIL's own
    # decompression-bomb refusal is lifted for this call to report the real size.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            # A JPEG with more pictures after the photo (a multi-picture MPF segment: cameras'
            # previews, phones' depth or HDR gain maps) is "MPO" to PIL; TensorFlow decodes
            # the photo, its first picture.
            fmt = "JPEG" if im.format == "MPO" else im.format
            (width, height), mode = im.size, im.mode
            orientation = _exif_orientation(im) if fmt == "JPEG" else 1
    except UnidentifiedImageError:
        if path.suffix.lower() in IMAGE_SUFFIXES:  # named as an image: a format PIL cannot read
            return _named_as_an_image(path), 0, 0, 1
        return "not an image file", 0, 0, 1
    except Exception as exc:  # noqa: BLE001 - any header failure means unusable
        return f"unreadable image header: {exc}", 0, 0, 1
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if fmt not in SUPPORTED_FORMATS:
        return UNSUPPORTED_FORMAT.format(fmt), 0, 0, 1
    if width * height > MAX_PIXELS:
        return (f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})", width, height,
                orientation)
    if fmt == "BMP" and mode == "P":
        # TensorFlow's BMP decoder has no palettes: it reads an 8-bit BMP's palette indices as
        # grey levels (right for PIL's "L", a grey ramp; other pictures wrong, silently) and
        # refuses fewer bits. PIL opens any other palette as "P".
        return ("colour-palette BMP: TensorFlow's decoder reads its palette indices as grey "
                "levels; save it as a 24-bit BMP or a PNG"), 0, 0, 1
    if fmt == "BMP" and mode == "1":  # TensorFlow: "channels ... must be 1, 3 or 4, was 0"
        return ("1-bit (black and white) BMP: TensorFlow's decoder reads 24/32-bit and 8-bit "
                "grey BMPs; save it as a PNG or a 24-bit BMP"), 0, 0, 1
    return None, width, height, orientation


def _named_as_an_image(path: Path) -> str:
    """The reason of a file named as an image that PIL cannot read: its format by its first
    bytes, as the served model names it (an iPhone's HEIC, even renamed .jpg: HEIC/HEIF), a web
    page saved under a photo's name (a download that got an error page), text, else an
    unsupported format named by the file's suffix."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        head = b""
    fmt = unsupported_format(head)
    if fmt:
        return UNSUPPORTED_FORMAT.format(fmt)
    if web_page(head):
        return (f"not an image file: a web page (HTML) named {path.suffix}, a download that got "
                "an error or sign-in page instead?")
    begins = text_start(head)
    if begins is not None:
        return f"not an image file: text named {path.suffix} (it begins {begins!r})"
    return (f"unsupported image format ({path.suffix} file; supported: "
            f"{', '.join(SUPPORTED_FORMATS)})")


def _exif_orientation(im) -> int:
    """The EXIF Orientation of an open PIL image: 1-8; 1 without one; 0 when its EXIF cannot be
    read (then counted as turned, so training reads it as the served graph does)."""
    if "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF: leave the decision to the decoder
        return 0
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


CHECK_BATCH = 512  # indices per Python step of check_decodable


def check_decodable(paths: list[str]) -> list[Optional[str]]:
    """Decode each file with TensorFlow (the training decoder); None if fine, else the reason.

    Decoding runs in parallel through tf.data with errors skipped, and the indices that did not
    come out are then decoded eagerly one by one to get their error message.
    """
    imports_settled("tensorflow")  # the command's side thread may be importing it still
    import tensorflow as tf

    from petalflow.tasks.images import decoded_shape, plain

    if not paths:
        return []
    # The lambdas are wrapped in plain (AutoGraph off): converting them, which parses this
    # file's source, was ~0.3 s of every scan.
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant(paths))
    )
    ds = ds.map(
        plain(lambda i, p: (i, decoded_shape(tf.io.read_file(p)))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    # The indices that came out, in batches: one Python step per image cost more than the
    # decoding (6,000 photos: 5.4 s -> BENCHMARKS.md).
    ds = without_autotuning(ds.map(plain(lambda i, _shape: i)).batch(CHECK_BATCH))
    good = {int(i) for batch in ds.as_numpy_iterator() for i in batch}
    reasons: list[Optional[str]] = [None] * len(paths)
    for idx in set(range(len(paths))) - good:
        reasons[idx] = why_refused(paths[idx])
        if reasons[idx]:  # said without decoding it again (TensorFlow's log line, twice)
            continue
        try:
            decoded_shape(tf.io.read_file(paths[idx]))
            reasons[idx] = "could not be decoded"
        except Exception as exc:  # noqa: BLE001 - TF raises several error types
            reasons[idx] = f"undecodable image: {_tf_message(exc)[:200]}"
    return reasons


def why_refused(path: str) -> Optional[str]:
    """What a file the decoder refused shows of why, said without decoding it again
    (TensorFlow's log line, twice), in the served model's words (``serving.why_undecodable``):
    "undecodable image: JPEG cut short (...)" for a JPEG or PNG that does not end as one does
    (TensorFlow says only "Invalid JPEG data or crop window" of the commonest bad image, a
    copy or download cut short), "undecodable image: animated WebP (...)" (TensorFlow: "WebP
    Animation must be 4 channel RGBA"). None otherwise (its decoder's message is the reason)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    return why_undecodable(head, tail)


def _tf_message(exc: Exception) -> str:
    """The first line of a TensorFlow error without its op wrapper: "{{function_node
    __wrapped__DecodeImage_...}} Unknown image file format... [Op:DecodeImage]" reads as
    "Unknown image file format..."."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text.splitlines()[0])
    return re.sub(r"\s*\[Op:\w+\]( name:.*)?$", "", line) or type(exc).__name__


def scan_dataset(data_root: Path, known: Optional[dict] = None,
                 hashes: Optional[FileHashes] = None) -> pd.DataFrame:
    """Walk the class folders of ``data_root`` into a manifest; never raises for a bad file.

    Hidden files, empty files, non-images, unsupported formats, huge images, undecodable bytes
    and images that appear under two different labels are kept in the manifest with
    ``status='quarantined'`` and a ``reason``.

    ``known`` (``earlier_verdicts``): sha256 -> (width, height, EXIF orientation) of contents
    an earlier scan with the same tools found usable; a file with such bytes is hashed but not
    opened or decoded again (data that grew decodes only its new files). ``hashes``
    (``FileHashes``): the digests an earlier scan of this folder read, reused for files that
    did not change since; it records this scan's.
    """
    known = known or {}
    hashes = hashes if hashes is not None else FileHashes()
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DatasetError(f"dataset folder {data_root} does not exist")
    parents = _class_parents(data_root)  # the folder layout, read once for the scan
    _classes, files = list_class_files(data_root, parents)
    if not files:
        _refuse_a_folder_of_archives(data_root)
    rows = []
    for rel, label in files:
        path = data_root / rel
        row = dict(path=rel, label=label, sha256="", size=0, width=0, height=0,
                   orientation=1, status="ok", reason="")
        try:
            row["sha256"], row["size"] = hashes.sha256(path, rel)
        except OSError as exc:
            row.update(status="quarantined", reason=f"unreadable file: {exc}")
            rows.append(row)
            continue
        inside = next((part for part in Path(rel).parts[:-1] if system_folder(part)), None)
        if any(part.startswith(".") for part in Path(rel).parts):
            row.update(status="quarantined", reason="hidden file")
        elif inside:
            row.update(status="quarantined", reason=f"in {inside}/, {system_folder(inside)}, "
                       "not a photo of the class")
        elif row["size"] == 0:
            row.update(status="quarantined", reason="empty file")
        elif row["sha256"] in known:
            row["width"], row["height"], row["orientation"] = known[row["sha256"]]
            row["reason"] = KNOWN  # checked by an earlier scan (cleared below)
        else:
            reason, row["width"], row["height"], row["orientation"] = _header_check(path)
            if reason:
                row.update(status="quarantined", reason=reason)
        rows.append(row)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"size": "int64", "width": "int64", "height": "int64",
                                "orientation": "int64"})

    # A copy of the class folders nested in the dataset: its files with the bytes of a file of
    # the same class outside it are that file again (neither decoded nor used twice).
    copies = tuple(f"{folder}/" for folder in copy_folders(data_root, parents))
    if copies:
        in_copy = manifest["path"].str.startswith(copies)
        outside = manifest[(manifest["status"] == "ok") & ~in_copy]
        originals = {}
        for row in outside.itertuples(index=False):
            originals.setdefault((row.label, row.sha256), row.path)
        for idx in manifest.index[(manifest["status"] == "ok") & in_copy]:
            original = originals.get((manifest.at[idx, "label"], manifest.at[idx, "sha256"]))
            if original:
                manifest.loc[idx, ["status", "reason"]] = ["quarantined", COPY_OF + original]

    checked = manifest["reason"] == KNOWN
    manifest.loc[checked, "reason"] = ""
    candidates = manifest.index[(manifest["status"] == "ok") & ~checked]
    reasons = check_decodable([str(data_root / p) for p in manifest.loc[candidates, "path"]])
    for idx, reason in zip(candidates, reasons):
        if reason:
            manifest.loc[idx, ["status", "reason"]] = ["quarantined", reason]
    if checked.any():
        log("scan: %d of %d files have the bytes of images earlier scans checked; %d decoded",
            int(checked.sum()), len(manifest), len(candidates))

    # The same bytes under two labels cannot be right for both: quarantine every copy.
    ok = manifest[manifest["status"] == "ok"]
    labels_per_hash = ok.groupby("sha256")["label"].nunique()
    conflicted = set(labels_per_hash[labels_per_hash > 1].index)
    if conflicted:
        for idx in ok.index[ok["sha256"].isin(conflicted)]:
            others = sorted(set(ok.loc[ok["sha256"] == ok.loc[idx, "sha256"], "label"]))
            manifest.loc[idx, ["status", "reason"]] = [
                "quarantined", SAME_IMAGE + ", ".join(others)
            ]
    manifest.loc[manifest["status"] != "ok", ["width", "height"]] = 0
    manifest.loc[manifest["status"] != "ok", "orientation"] = 1
    return manifest


def _image_files(rows: pd.DataFrame) -> pd.Series:
    """Which manifest rows are images (usable or not): usable, recognised by PIL, or named
    like an image; not notes, files kept beside photos, hidden files or empty files with other
    names."""
    recognised = (rows["status"] == "ok") | ~(rows["reason"].isin(
        ["not an image file", "hidden file", "empty file"])
        | rows["reason"].str.startswith(NOT_A_PHOTO, na=False).astype(bool))
    return recognised | rows["path"].map(
        lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES).astype(bool)


def image_free_folders(manifest: pd.DataFrame) -> list[str]:
    """Folders with files but not one image among them (no usable image, no image-like name,
    nothing PIL recognised): they are reported and skipped, not treated as classes."""
    return [str(label) for label, rows in manifest.groupby("label", sort=True)
            if not _image_files(rows).any()]


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Sorted labels that have at least one usable image: index i is model output i."""
    return sorted(manifest.loc[manifest["status"] == "ok", "label"].unique().tolist())


def _rank(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def split_dataset(
    manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Add a ``split`` column: stratified per class, deterministic in ``seed``.

    Files with identical bytes form one group and always land in the same split. Each class needs
    at least one group in each split; raises DatasetError naming the class otherwise, and when
    fewer than two classes have usable images.
    """
    manifest = manifest.copy()
    manifest["split"] = ""
    ok = manifest[manifest["status"] == "ok"]
    all_labels = sorted(manifest["label"].unique().tolist())
    usable = class_names(manifest)
    if len(usable) < 2:
        raise _too_few_classes(manifest, usable)
    skipped = set(image_free_folders(manifest))
    groups_of = {label: sorted(ok.loc[ok["label"] == label, "sha256"].unique(),
                               key=lambda s: _rank(seed, s))
                 for label in all_labels if label not in skipped}

    def sizes(n: int) -> tuple[int, int]:
        return (max(MIN_PER_SPLIT, round(n * test_fraction)),
                max(MIN_PER_SPLIT, round(n * val_fraction)))

    small = {label: len(g) for label, g in groups_of.items() if len(g) - sum(sizes(len(g))) < 1}
    if small:
        raise _too_small_to_split(manifest, small, val_fraction, test_fraction)
    for label, groups in groups_of.items():
        n = len(groups)
        n_test, n_val = sizes(n)
        assignment = {}
        for i, sha in enumerate(groups):
            assignment[sha] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
        rows = ok.index[ok["label"] == label]
        manifest.loc[rows, "split"] = ok.loc[rows, "sha256"].map(assignment)
    return manifest


def _too_few_classes(manifest: pd.DataFrame, usable: list[str],
                     labels: Optional[str] = None) -> DatasetError:
    """The error for fewer than 2 classes with usable images. With ``labels`` (where the
    labels seem to be instead: ``labels_elsewhere``) it says that. When other folders hold
    image files that were all quarantined (a dataset of TIFFs, HEIC photos), it says so, with
    the commonest reason and one of the files: the layout is right, the files are not (and no
    manifest is written to look them up in)."""
    found = (f"need at least 2 classes with usable images, found {len(usable)} "
             f"({', '.join(usable) or 'none'})")
    if labels:
        return DatasetError(f"{found}: {labels}")
    others = manifest[~manifest["label"].isin(usable)]
    images = others[_image_files(others)]
    if images.empty:
        return DatasetError(f"{found}; put each class's images in its own subfolder")
    labels = sorted(images["label"].astype(str).unique())
    named = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    top, count = next(iter(images["reason"].value_counts().items()))
    example = images.loc[images["reason"] == top, "path"].iloc[0]
    share = f", {count} of them: " if count < len(images) else ": "
    copies = _copies_of_one_dataset(manifest) if top.startswith(SAME_IMAGE) else ""
    return UnusableImages(
        f"{found}: the {counted(len(images), 'image file')} in "
        f"{named} {'were' if len(images) > 1 else 'was'} quarantined{share}{top}; "
        f"e.g. {example}{copies}")


def _copies_of_one_dataset(manifest: pd.DataFrame, shown: int = 5) -> str:
    """"; A and B hold the same subfolders (…): …" when the class folders (2 or more) hold
    subfolders with images under the same names: two copies or exports of one dataset
    (``export 2025-11/Circle/``, ``export 2025-12/Circle/``), whose classes are the
    subfolders, given together; else ""."""
    subfolders: dict[str, set[str]] = {}
    for parts in manifest["path"].astype(str).str.split("/"):
        if len(parts) >= 3:
            subfolders.setdefault(parts[0], set()).add(parts[1])
    if len(subfolders) < 2:
        return ""
    shared = sorted(set.intersection(*subfolders.values()))
    if not shared:
        return ""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")

    return (f"; {listed(sorted(subfolders))} hold the same subfolders "
            f"({listed(shared)}): copies or exports of one dataset, "
            "whose classes are those subfolders? Give one of them as the dataset (its folder, "
            "or an archive of it alone)")


def _too_small_to_split(manifest: pd.DataFrame, small: dict[str, int], val_fraction: float,
                        test_fraction: float) -> DatasetError:
    """The error for classes with too few distinct usable images to split: the one class, or
    every such class (a long-tailed dataset has many: fixing one at a time took a run each),
    fewest first."""
    need = 2 * MIN_PER_SPLIT + 1
    settings = f"val_fraction={val_fraction}, test_fraction={test_fraction}"
    if len(small) == 1:
        [(label, n)] = small.items()
        return DatasetError(
            f"class {label!r} has {counted(n, 'distinct usable image')}; at least {need} are "
            f"needed to split it into train/val/test ({settings})."
            f"{_why_unusable(manifest, label)} Add images or remove the class folder.")
    ranked = sorted(small.items(), key=lambda item: (item[1], item[0]))
    shown = ", ".join(f"{label!r} ({n})" for label, n in ranked[:10])
    more = f" and {len(ranked) - 10} more" if len(ranked) > 10 else ""
    return DatasetError(
        f"{len(small)} classes have too few distinct usable images to split into "
        f"train/val/test (at least {need} each, {settings}): {shown}{more}. Add images or "
        "remove those class folders.")


def _why_unusable(manifest: pd.DataFrame, label: str) -> str:
    """" N of its files were quarantined, mostly: <reason>." for a class's quarantined files
    (the manifest has them all), or "" when none was."""
    reasons = manifest.loc[(manifest["label"] == label) & (manifest["status"] != "ok"), "reason"]
    if reasons.empty:
        return ""
    top, count = next(iter(reasons.value_counts().items()))
    return (f" {len(reasons)} of its files were quarantined"
            + (f", {count} of them: {top}." if count < len(reasons) else f": {top}."))


def dataset_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over the sorted (path, label, sha256) of the usable rows: identifies the data."""
    ok = manifest[manifest["status"] == "ok"].sort_values(["label", "path"])
    digest = hashlib.sha256()
    for path, label, sha in ok[["path", "label", "sha256"]].itertuples(index=False):
        digest.update(f"{path}\t{label}\t{sha}\n".encode())
    return digest.hexdigest()


def dataset_counts(manifest: pd.DataFrame) -> dict:
    """found / used / quarantined counts, per split, the quarantined files per kind of reason
    and at most ``SHOWN_REASONS`` of them by name: a size that does not grow with the data."""
    used = manifest[manifest["status"] == "ok"]
    counts = {
        "found": int(len(manifest)),
        "used": int(len(used)),
        "quarantined": int((manifest["status"] != "ok").sum()),
        "classes": class_names(manifest),
    }
    if "split" in manifest:
        counts["splits"] = {s: int((used["split"] == s).sum()) for s in ("train", "val", "test")}
    if "orientation" in manifest:
        counts["turned"] = int((used["orientation"] > 1).sum())
        counts["exif_unreadable"] = int((used["orientation"] == 0).sum())
    quarantined = manifest[manifest["status"] != "ok"]
    reasons = {row.path: row.reason for row in quarantined.itertuples(index=False)}
    counts["quarantined_by_reason"] = count_by_kind(reasons)
    counts["quarantine_reasons"] = shown_reasons(reasons)
    return counts


# The scan's own version, written into dataset.json: a manifest is reused (``prepare_dataset``
# with ``unchanging``) only when the scan that wrote it was this one. Raise it with any change
# to what the scan decides (which files are used or quarantined, the split, the counts).
SCAN_VERSION = 5  # 2: copies of the class folders nested in the dataset (nested_copies);
#                  3: class names in Unicode's composed form (class_label), 1-bit BMPs named;
#                  4: NAS and system folders (SYSTEM_FOLDERS: @eaDir, #recycle) no photos;
#                  5: WebPs with an alpha channel decoded (serving.decode_rgb)
KNOWN = "\0known"  # scan_dataset's mark, in ``reason``, of a file whose bytes were checked before


def scan_tools() -> str:
    """What a file's verdict depends on besides its bytes: this scan's version and the decoders
    (TensorFlow's for the decode check, Pillow's for the header)."""
    from importlib.metadata import PackageNotFoundError, version

    tools = [f"scan {SCAN_VERSION}"]
    for package in ("tensorflow", "pillow"):
        try:
            tools.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            tools.append(f"{package} ?")
    return ", ".join(tools)


def earlier_verdicts(manifests_dir: Path) -> dict:
    """sha256 -> (width, height, EXIF orientation) of every usable image in the manifests under
    ``manifests_dir`` written with this ``scan_tools()`` (the data's earlier versions and other
    sources, ``prepare_dataset``'s folders)."""
    tools, known = scan_tools(), {}
    for _, written in _descriptions(manifests_dir):
        if written.get("scan_tools") != tools:
            continue
        try:
            rows = pd.read_csv(written["manifest"], keep_default_na=False, dtype={"sha256": str},
                               usecols=["sha256", "width", "height", "orientation", "status"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rows = rows[rows["status"] == "ok"]
        known.update(zip(rows["sha256"], zip(rows["width"].astype(int),
                                             rows["height"].astype(int),
                                             rows["orientation"].astype(int))))
    return known


def prepare_dataset(
    data_root: Path, out_dir: Path, val_fraction: float, test_fraction: float, seed: int,
    unchanging: bool = False,
) -> DatasetInfo:
    """Scan, split and fingerprint ``data_root``; write ``manifest.csv`` and ``dataset.json``.

    Returns the dataset description (also in dataset.json): data_root, manifest path, classes,
    fingerprint and counts. ``unchanging``: ``data_root`` never changes once written (an
    archive's extraction, renamed into place whole under the archive's digest), so the
    description an earlier scan of that very folder wrote into ``out_dir`` (the same split
    settings) is returned instead of scanning it again: a scheduled run on unchanged data
    reads no photo. Otherwise the scan takes the verdicts of earlier manifests beside
    ``out_dir`` (``earlier_verdicts``): data that grew or changed decodes only its new files.
    """
    out_dir = Path(out_dir)
    if unchanging and (earlier := _earlier_scan(data_root, out_dir)) is not None:
        return earlier
    not_classes = folders_not_classes_problem(data_root)
    if not_classes:
        raise DatasetError(not_classes)
    known = earlier_verdicts(out_dir.parent)
    # An extraction is scanned once (then its manifest is reused): its files' record is of no use.
    hashes = None if unchanging else FileHashes(earlier_hashes(out_dir.parent, data_root))
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = scan_dataset(data_root, known, hashes)
    if hashes is not None and hashes.earlier:
        log("scan: %d of %d files read (the others unchanged since an earlier scan of %s)",
            hashes.read, len(manifest), data_root)
    usable = class_names(manifest)
    if len(usable) < 2 and (labels := labels_elsewhere(data_root, manifest, unchanging)):
        raise _too_few_classes(manifest, usable, labels)
    manifest = split_dataset(manifest, val_fraction, test_fraction, seed)
    manifest_path = out_dir / "manifest.csv"
    tmp = out_dir / f".manifest.{os.getpid()}.csv"
    manifest.to_csv(tmp, index=False)
    os.replace(tmp, manifest_path)  # concurrent runs never see a half-written manifest
    counts = dataset_counts(manifest)
    # Folders without files, or without a single image, are ignored (reported), not an error:
    # after a successful split they are exactly the folders that yielded no class.
    parents = _class_parents(data_root)
    counts["empty_class_folders"] = sorted(
        set(candidate_classes(data_root, parents)) - set(class_names(manifest)))
    counts["split_folders"], counts["unlabeled_split_folders"] = split_folders(data_root)
    counts["nested_copies"] = copy_folders(data_root, parents)
    if not counts["split_folders"]:  # (paths then begin with the split's folder)
        inner = subfolders_by_class(manifest)
        counts["classes_of_subfolders"] = classes_of_subfolders(inner)
        counts["classes_in_one_subfolder"] = classes_in_one_subfolder(inner)
    loose = loose_images(data_root)
    counts["loose_images"], counts["loose_image_examples"] = len(loose), loose[:5]
    info: DatasetInfo = {
        "data_root": str(Path(data_root).resolve()),
        "manifest": str(manifest_path.resolve()),
        "classes": class_names(manifest),
        "fingerprint": dataset_fingerprint(manifest),
        "counts": counts,
    }
    if hashes is not None:
        hashes.write(out_dir / HASHES_FILE)
    write_json(out_dir / "dataset.json", {**info, "scan_version": SCAN_VERSION,
                                          "scan_tools": scan_tools(),
                                          "scanned_folder": _folder_identity(data_root)})
    return info


def prune_manifests(manifests_dir: Path) -> tuple[int, set[str]]:
    """Remove the manifests (``prepare_dataset``'s folders) of dataset folders that are gone,
    such as extractions ``download.prune_extractions`` removed: each run's manifest is in its
    MLflow run. Returns how many were removed and the fingerprints of the ones kept."""
    removed, kept = 0, set()
    for folder, written in _descriptions(manifests_dir):
        if not isinstance(written.get("data_root"), str) or "fingerprint" not in written:
            continue
        if Path(written["data_root"]).exists():
            kept.add(written["fingerprint"])
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed, kept


def described_shas(manifests_dir: Path) -> set[str]:
    """The sha256 of every usable file the manifests under ``manifests_dir`` describe (after
    ``prune_manifests``: the data each source has now)."""
    shas: set[str] = set()
    for folder, _ in _descriptions(manifests_dir):
        try:
            rows = pd.read_csv(folder / "manifest.csv", usecols=["sha256", "status"],
                               dtype=str, keep_default_na=False)
        except (OSError, ValueError):
            continue
        shas.update(rows.loc[rows["status"] == "ok", "sha256"])
    return shas


def _descriptions(manifests_dir: Path):
    """(folder, its dataset.json) for each ``prepare_dataset`` folder under ``manifests_dir``
    whose description can be read."""
    for described in sorted(Path(manifests_dir).glob("*/dataset.json")):
        try:
            written = json.loads(described.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(written, dict):
            yield described.parent, written


def _folder_identity(folder: Path) -> list[int]:
    """(inode, modification time) of ``folder``: an extraction redone in its place (a newer
    petalflow extracting an old download again) is another folder."""
    st = os.stat(folder)
    return [st.st_ino, st.st_mtime_ns]


def _earlier_scan(data_root: Path, out_dir: Path) -> Optional[DatasetInfo]:
    """The description in ``out_dir/dataset.json`` when this scan version wrote it for
    ``data_root`` and its manifest is there; else None."""
    try:
        written = json.loads((out_dir / "dataset.json").read_text(encoding="utf-8"))
        if (written.get("scan_tools") != scan_tools()
                or written["data_root"] != str(Path(data_root).resolve())
                or written.get("scanned_folder") != _folder_identity(data_root)
                or not Path(written["manifest"]).is_file()):
            return None
        info: DatasetInfo = {key: written[key] for key in DatasetInfo.__annotations__}
        if "loose_images" not in info["counts"]:  # written before they were counted
            loose = loose_images(data_root)
            info["counts"].update(loose_images=len(loose), loose_image_examples=loose[:5])
        # Written before these were counted (and, as the scan does, not for split folders).
        if ("classes_in_one_subfolder" not in info["counts"]
                and not info["counts"].get("split_folders")):
            info["counts"]["classes_in_one_subfolder"] = classes_in_one_subfolder(
                subfolders_by_class(load_manifest(Path(written["manifest"]))))
        if "quarantined_by_reason" not in info["counts"]:  # every file's reason, as before
            info["counts"].update(quarantined_by_reason=reasons_by_kind(info["counts"]),
                                  quarantine_reasons=shown_reasons(
                                      info["counts"]["quarantine_reasons"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    log("scan: %s was scanned before (an extracted archive does not change): its manifest "
        "is reused", data_root)
    return info


def load_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest CSV back with the right dtypes (empty strings stay strings)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"label": str, "path": str, "split": str})


def changed_since_scan(info: DatasetInfo) -> Optional[str]:
    """What is gone or changed among the files the scan used (their size differs from the
    manifest's), said for a run that failed reading them; None when every one is as scanned.
    Only asked after a failure: a stat per file."""
    used = load_manifest(Path(info["manifest"]))
    used = used[used["status"] == "ok"]
    root = Path(info["data_root"])
    gone, changed = [], []
    for rel, size in zip(used["path"], used["size"]):
        try:
            if (root / rel).stat().st_size != int(size):
                changed.append(rel)
        except OSError:
            gone.append(rel)
    if not gone and not changed:
        return None

    def named(paths: list[str], what: str) -> str:
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        return f"{counted(len(paths), 'file')} {what} ({', '.join(paths[:3])}{more})"

    parts = [named(gone, "is gone" if len(gone) == 1 else "are gone") if gone else "",
             named(changed, "changed") if changed else ""]
    return (f"the dataset changed during the run: of the files it scanned in {root}, "
            f"{' and '.join(p for p in parts if p)}, removed, moved or rewritten while the run "
            "read them; run again: the next run scans the data as it is then")


@contextlib.contextmanager
def unchanged_data(info: DatasetInfo) -> Iterator[None]:
    """Runs a stage that reads the scanned files (training, evaluation): a failure while files
    it reads are gone or changed since the scan (a folder source someone curates, a sync client
    writing into it) is ``DatasetChanged`` saying which, not TensorFlow's NotFoundError or a
    decoding error about one file; any other failure is raised as it is."""
    from petalflow.tasks.errors import DatasetChanged

    try:
        yield
    except Exception as exc:
        try:
            problem = changed_since_scan(info)
        except Exception:  # noqa: BLE001 - the manifest itself gone: the failure as it was
            problem = None
        if problem is None:
            raise
        raise DatasetChanged(problem) from exc


def reads_exif(data_info: DatasetInfo) -> bool:
    """Whether decoding this dataset's files must read their EXIF orientation: some are turned
    or have EXIF PIL could not read, or the scan did not say (the served model always reads
    it)."""
    counts = data_info["counts"]
    return counts.get("turned") != 0 or counts.get("exif_unreadable") != 0


def _split_rows(data_info: DatasetInfo, split: str,
                manifest: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The manifest's usable rows of one split (the manifest read unless given)."""
    if manifest is None:
        manifest = load_manifest(Path(data_info["manifest"]))
    return manifest[(manifest["status"] == "ok") & (manifest["split"] == split)]


def split_files(data_info: DatasetInfo, split: str, manifest: Optional[pd.DataFrame] = None
                ) -> tuple[list[str], np.ndarray]:
    """Absolute file paths and label indices (into data_info['classes']) of one split
    (``manifest``: ``load_manifest`` of data_info's, when the caller has read it already)."""
    rows = _split_rows(data_info, split, manifest)
    index = {name: i for i, name in enumerate(data_info["classes"])}
    root = Path(data_info["data_root"])
    paths = [str(root / p) for p in rows["path"]]
    return paths, np.array([index[label] for label in rows["label"]], dtype=np.int32)


def split_shas(data_info: DatasetInfo, split: str, manifest: Optional[pd.DataFrame] = None
               ) -> list[str]:
    """The sha256 of each file of ``split_files(data_info, split)``, in the same order."""
    return _split_rows(data_info, split, manifest)["sha256"].tolist()


@task(name="scan-and-split")
def prepare_dataset_task(
    data_root: str, out_dir: str, val_fraction: float, test_fraction: float, seed: int,
    unchanging: bool = False,
) -> DatasetInfo:
    with disk_full_said("scanning the dataset", (Path(out_dir), "the dataset's manifest")):
        return prepare_dataset(Path(data_root), Path(out_dir), val_fraction, test_fraction,
                               seed, unchanging)

"""One reader per dataset layout. Readers only *list* inputs: each yields lightweight
:class:`Ref` records (source, id, split, where the bytes are), never pixels.

Layouts (read in place, archives are never extracted):

* DIV2K: ``PATH/DIV2K_train_HR/`` and/or ``PATH/DIV2K_valid_HR/`` folders, or the distributed
  ``DIV2K_train_HR.zip`` / ``DIV2K_valid_HR.zip`` (folder preferred when both exist). PATH may also
  be one of those folders or zips itself. train_HR -> ``train``, valid_HR -> ``val``.
* BSDS500: ``BSR/BSDS500/data/images/{train,val,test}/*.jpg`` where PATH is the folder holding
  ``BSR/``, ``BSR/`` itself (or ``BSDS500/``), or ``BSR_bsds500.tgz`` (or a folder holding it).
* Open Images: folders (or ``.tar.gz``) named ``train_0`` .. ``train_f`` / ``train``,
  ``validation``, ``test`` holding ``<ImageID>.jpg``; PATH is such a folder or archive, or the
  folder holding them. ``*.csv`` files beside them (or given as PATH) with ``ImageID`` and
  ``Rotation`` columns supply the rotation (counter-clockwise degrees, see images.py).
* folder: any tree of images; split by a stable hash of the relative path.
* default: the natural colour photographs shipped inside scikit-image (no download).

Only files with an image extension are considered (so ``Thumbs.db`` & co. are ignored); a file
with an image extension that is not a decodable image is skipped later, with a reason.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from restorer.errors import UserError
from shard_tools.images import IMAGE_EXTENSIONS, Skip

log = logging.getLogger("shard_tools.sources")

SOURCES = ("div2k", "bsds", "openimages", "folder", "default")

# The natural colour photographs scikit-image ships (synthetic / gray / texture images excluded).
# val is fixed (3 photos, so val always holds >= 2); the rest is train.
DEFAULT_TRAIN = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
)
DEFAULT_VAL = ("chelsea.png", "coffee.png", "rocket.jpg")


class Ref(NamedTuple):
    source: str
    source_id: str
    split: str
    kind: str  # "file" | "zip" | "tar"
    container: str  # file path, or the archive path
    member: str  # member name inside the archive ("" for files)
    size: int  # bytes, as listed
    rotation: int | None = None  # explicit counter-clockwise degrees (Open Images)
    lossy: bool = False  # the builder may downscale these

    @property
    def key(self) -> str:
        return f"{self.source}/{self.source_id}"

    @property
    def where(self) -> str:
        return f"{self.container}:{self.member}" if self.member else self.container


@dataclass
class Stream:
    """Refs of one split from one input. ``sequential`` streams (tar archives) must be read in
    their stored order; the others allow random access and are shuffled."""

    name: str
    split: str
    sequential: bool
    refs: list[Ref] = field(default_factory=list)


def clean_id(text: str) -> str:
    """A source id usable in a webdataset key: no dots, no backslashes, no leading slash."""
    return text.replace("\\", "/").strip("/").replace(".", "_")


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` (same on every machine and Python version)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def _require(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: {what} input not found")
    return p


def _is_tar(p: Path) -> bool:
    return p.is_file() and (p.name.endswith((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")))


def _list_dir(root: Path) -> list[tuple[Path, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_name(name):
                p = Path(dirpath) / name
                try:
                    out.append((p, p.stat().st_size))
                except OSError:
                    out.append((p, -1))
    return out


def _list_tar(p: Path) -> list[tuple[str, int]]:
    try:
        with tarfile.open(p, "r:*") as tf:
            return [(m.name, m.size) for m in tf if m.isfile() and is_image_name(m.name)]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{p}: cannot read archive ({exc})") from None


def _list_zip(p: Path) -> list[tuple[str, int]]:
    try:
        with zipfile.ZipFile(p) as zf:
            return [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir() and is_image_name(i.filename)]
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{p}: cannot read zip archive ({exc})") from None


# ----------------------------------------------------------------------------------- DIV2K
_DIV2K = {"DIV2K_train_HR": "train", "DIV2K_valid_HR": "val"}


def div2k(path: str) -> list[Stream]:
    p = _require(path, "DIV2K")
    candidates: dict[str, Path] = {}
    stem = p.name[:-4] if p.name.endswith(".zip") else p.name
    if stem in _DIV2K:
        candidates[stem] = p
    elif p.is_dir():
        for name in _DIV2K:
            if (p / name).is_dir():
                candidates[name] = p / name
            elif (p / f"{name}.zip").is_file():
                candidates[name] = p / f"{name}.zip"
    if not candidates:
        raise UserError(f"{p}: unknown DIV2K layout (expected DIV2K_train_HR/ or DIV2K_valid_HR/, as folders or .zip)")
    streams = []
    for name, c in sorted(candidates.items()):
        split = _DIV2K[name]
        s = Stream(f"div2k:{c}", split, sequential=False)
        if c.is_dir():
            for f, size in _list_dir(c):
                s.refs.append(
                    Ref("div2k", clean_id(f.relative_to(c).with_suffix("").as_posix()), split, "file", str(f), "", size)
                )
        else:
            for member, size in _list_zip(c):
                rel = PurePosixPath(member)
                parts = rel.parts[1:] if rel.parts and rel.parts[0] == name else rel.parts
                sid = clean_id(str(PurePosixPath(*parts).with_suffix("")))
                s.refs.append(Ref("div2k", sid, split, "zip", str(c), member, size))
        streams.append(s)
    return streams


# ----------------------------------------------------------------------------------- BSDS500
_BSDS_RE = re.compile(r"(?:^|/)(?:BSR/)?BSDS500/data/images/(train|val|test)/([^/]+)$")


def bsds(path: str) -> list[Stream]:
    p = _require(path, "BSDS500")
    if p.is_dir():
        for sub in ("BSR/BSDS500/data/images", "BSDS500/data/images", "data/images"):
            if (p / sub).is_dir():
                root = p / sub
                streams = []
                for split in ("train", "val", "test"):
                    if not (root / split).is_dir():
                        continue
                    s = Stream(f"bsds:{root / split}", split, sequential=False)
                    for f, size in _list_dir(root / split):
                        s.refs.append(
                            Ref(
                                "bsds",
                                clean_id(f.relative_to(root / split).with_suffix("").as_posix()),
                                split,
                                "file",
                                str(f),
                                "",
                                size,
                            )
                        )
                    streams.append(s)
                if not streams:
                    break
                return streams
        tgz = p / "BSR_bsds500.tgz"
        if tgz.is_file():
            p = tgz
        else:
            raise UserError(
                f"{p}: unknown BSDS500 layout (expected BSR/BSDS500/data/images/{{train,val,test}}/ or BSR_bsds500.tgz)"
            )
    if not _is_tar(p):
        raise UserError(f"{p}: unknown BSDS500 layout (expected a folder or BSR_bsds500.tgz)")
    by_split: dict[str, Stream] = {}
    for member, size in _list_tar(p):
        m = _BSDS_RE.search(member)
        if not m:
            continue
        split = m.group(1)
        s = by_split.setdefault(split, Stream(f"bsds:{p}:{split}", split, sequential=True))
        s.refs.append(
            Ref("bsds", clean_id(str(PurePosixPath(m.group(2)).with_suffix(""))), split, "tar", str(p), member, size)
        )
    if not by_split:
        raise UserError(f"{p}: unknown BSDS500 layout (no BSDS500/data/images/<split>/ members)")
    return list(by_split.values())


# ----------------------------------------------------------------------------------- Open Images
_OI_SPLIT = re.compile(r"^(train(?:_[0-9a-f])?|validation|test)(?:\.tar(?:\.gz)?|\.tgz)?$")


def _oi_split(name: str) -> str | None:
    m = _OI_SPLIT.match(name)
    if not m:
        return None
    tag = m.group(1)
    return "train" if tag.startswith("train") else ("val" if tag == "validation" else "test")


def read_rotations(csv_path: Path) -> dict[str, int]:
    """ImageID -> counter-clockwise degrees, for the rows whose Rotation is a non-zero number."""
    out: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "ImageID" not in reader.fieldnames:
                raise UserError(f"{csv_path}: not an Open Images image-ids CSV (no ImageID column)")
            if "Rotation" not in reader.fieldnames:
                return out
            for row in reader:
                text = (row.get("Rotation") or "").strip()
                if not text or text.lower() == "nan":
                    continue
                try:
                    deg = int(round(float(text)))
                except ValueError:
                    continue
                if deg % 360:
                    out[row["ImageID"]] = deg % 360
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: cannot read CSV ({exc})") from None
    return out


def openimages(paths: list[str]) -> list[Stream]:
    dirs: list[tuple[str, Path]] = []  # (split, folder or archive)
    csvs: list[Path] = []
    for path in paths:
        p = _require(path, "Open Images")
        if p.is_file() and p.suffix.lower() == ".csv":
            csvs.append(p)
            continue
        split = _oi_split(p.name)
        if split and (p.is_dir() or _is_tar(p)):
            dirs.append((split, p))
            csvs.extend(sorted(p.parent.glob("*.csv")) if p.is_dir() else [])
            continue
        if p.is_dir():
            found = [(sp, c) for c in sorted(p.iterdir()) if (sp := _oi_split(c.name)) and (c.is_dir() or _is_tar(c))]
            if found:
                dirs.extend(found)
                csvs.extend(sorted(p.glob("*.csv")))
                continue
        raise UserError(
            f"{p}: unknown Open Images layout (expected train_0..train_f/, "
            "validation/, test/ folders or .tar.gz, or an image-ids .csv)"
        )
    if not dirs:
        raise UserError(f"{paths[0]}: no Open Images image folders found (only CSV files given)")
    rotations: dict[str, int] = {}
    for c in dict.fromkeys(csvs):
        rotations.update(read_rotations(c))
    log.info("openimages: %d rotated images listed in %d CSV file(s)", len(rotations), len(csvs))
    streams = []
    for split, c in dirs:
        seq = not c.is_dir()
        s = Stream(f"openimages:{c}", split, sequential=seq)
        listing = (
            [(str(f), str(f.relative_to(c)), n) for f, n in _list_dir(c)]
            if c.is_dir()
            else [(str(c), m, n) for m, n in _list_tar(c)]
        )
        for container, member_or_rel, size in listing:
            image_id = PurePosixPath(member_or_rel).stem
            s.refs.append(
                Ref(
                    "openimages",
                    clean_id(image_id),
                    split,
                    "tar" if seq else "file",
                    container,
                    member_or_rel if seq else "",
                    size,
                    rotations.get(image_id),
                    lossy=True,
                )
            )
        streams.append(s)
    return streams


# ----------------------------------------------------------------------------------- folder
def folder(path: str, val_fraction: float) -> list[Stream]:
    p = _require(path, "folder")
    if not p.is_dir():
        raise UserError(f"{p}: --folder expects a directory of images")
    streams = {"train": Stream(f"folder:{p}:train", "train", False), "val": Stream(f"folder:{p}:val", "val", False)}
    root_name = p.resolve().name or "root"
    for f, size in _list_dir(p):
        rel = f.relative_to(p).as_posix()
        split = "val" if stable_fraction(rel) < val_fraction else "train"
        sid = clean_id(f"{root_name}/{str(PurePosixPath(rel).with_suffix(''))}")
        streams[split].refs.append(Ref("folder", sid, split, "file", str(f), "", size))
    return [s for s in streams.values() if s.refs]


# ----------------------------------------------------------------------------------- default
def skimage_data_dir() -> Path:
    # Imported here, not at the top: only the embedded default set needs scikit-image, and the
    # Python that `make gpu-check` runs on a GPU machine may lack it (bench/gpu_check.py builds
    # BSDS500 shards; tests/test_gpu_check.py runs it with scikit-image blocked). Not for speed:
    # `import skimage` takes 0.01 s (it loads its submodules lazily).
    import skimage

    return Path(skimage.__file__).parent / "data"


def default() -> list[Stream]:
    d = skimage_data_dir()
    streams = []
    for split, names in (("train", DEFAULT_TRAIN), ("val", DEFAULT_VAL)):
        s = Stream(f"default:{split}", split, False)
        for name in names:
            f = d / name
            if not f.is_file():
                raise UserError(f"{f}: scikit-image's sample photograph is missing (reinstall scikit-image)")
            s.refs.append(Ref("default", clean_id(Path(name).stem), split, "file", str(f), "", f.stat().st_size))
        streams.append(s)
    return streams


# ----------------------------------------------------------------------------------- reading
class Reader:
    """Reads the bytes of file and zip refs (random access). Keeps zip handles open."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._zips: dict[str, zipfile.ZipFile] = {}

    def read(self, ref: Ref) -> bytes:
        if ref.kind == "file":
            with open(ref.container, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
        elif ref.kind == "zip":
            zf = self._zips.get(ref.container)
            if zf is None:
                zf = self._zips[ref.container] = zipfile.ZipFile(ref.container)
            with zf.open(ref.member) as fh:
                data = fh.read(self.max_bytes + 1)
        else:
            raise ValueError("tar members are read sequentially by the builder")
        if len(data) > self.max_bytes:
            raise Skip(f"file larger than max_file_bytes {self.max_bytes}")
        return data

    def close(self) -> None:
        for zf in self._zips.values():
            zf.close()
        self._zips.clear()


class TarCursor:
    """Walks one tar archive forward, returning the bytes of requested members in stored order."""

    def __init__(self, path: str, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self._tf = tarfile.open(path, "r|*")
        self._it = iter(self._tf)

    def read(self, member: str) -> bytes:
        for info in self._it:
            if info.name != member:
                continue
            if info.size > self.max_bytes:
                raise Skip(f"file larger than max_file_bytes {self.max_bytes}")
            fh = self._tf.extractfile(info)
            return fh.read() if fh is not None else b""
        raise Skip(f"member {member} not found in {self.path} (archive changed?)")

    def close(self) -> None:
        self._tf.close()

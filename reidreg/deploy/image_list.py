"""Which image files to embed: a folder (searched recursively), a list file, or one image.

Only the file system is consulted (no image is opened, no torch is imported), so a wrong ``images=`` is
reported at once, before a checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reidreg.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageList:
    """Image files in a fixed order: ``paths`` are opened, ``names`` are stored with the features.

    ``names`` are POSIX paths relative to the folder for a folder, the entries as written for a list
    file, the file name for a single image.
    """

    names: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, count: int) -> ImageList:
        """The first ``count`` images."""
        return ImageList(self.names[:count], self.paths[:count])


def list_images(source: str | Path, *, option: str) -> ImageList:
    """The images of ``source``, a folder, a list file or one image; ``option`` is named in errors.

    Folder: every file with a suffix of ``IMAGE_SUFFIXES`` (any case) below it, sorted by relative path.
    List file: one path per line, relative to the list file's folder or absolute; blank lines and lines
    starting with ``#`` are ignored; the order is kept.
    """
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{option}={str(path)!r} does not exist; expected a folder of images, a list file (one image "
            "path per line) or one image."
        )
    if path.is_dir():
        return _folder_images(path, option)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageList([path.name], [path])
    return _listed_images(path, option)


def _folder_images(folder: Path, option: str) -> ImageList:
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not found:
        raise ConfigError(
            f"{option}={str(folder)!r}: no images found (searched recursively for "
            f"{', '.join(IMAGE_SUFFIXES)})."
        )
    names = {p: p.relative_to(folder).as_posix() for p in found}
    paths = sorted(found, key=names.__getitem__)
    return ImageList([names[p] for p in paths], paths)


def _listed_images(list_file: Path, option: str) -> ImageList:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(
            f"{option}={str(list_file)!r} is neither a folder, an image ({', '.join(IMAGE_SUFFIXES)}) nor a "
            "text list file of image paths."
        ) from None
    names: list[str] = []
    paths: list[Path] = []
    missing: list[str] = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        if not path.is_file():
            missing.append(f"line {number}: {entry!r}")
        names.append(entry)
        paths.append(path)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConfigError(
            f"{option}={str(list_file)!r}: {len(missing)} listed image(s) are not files: "
            f"{', '.join(missing[:3])}{more}; paths are relative to the list file's folder or absolute."
        )
    if not paths:
        raise ConfigError(f"{option}={str(list_file)!r}: the list file names no images (one path per line).")
    return ImageList(names, paths)

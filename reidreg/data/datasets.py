"""Person re-identification datasets on disk: Market-1501, DukeMTMC-reID, MSMT17 and the synthetic set.

Every experiment in reidreg must see exactly the same samples, so the parsers follow the naming rules of
the real datasets as torchreid and fast-reid do (docs/protocol.md, "Datasets"):

* pid −1 (junk) is dropped everywhere; pid 0 (distractors) stays in the gallery as a negative — in
  Market-style datasets only: MSMT17 has no distractors, its pid 0 is an ordinary identity;
* cameras are 0-based (``c1`` → camid 0);
* training pids are relabelled 0..N−1 in sorted order (they are classification labels), while query and
  gallery keep their original pids (only equality between them matters).

The parsers only list directories (``os.scandir``) and never open an image, so even MSMT17's 126k files
are indexed quickly. Any layout or naming problem raises a single :class:`DatasetError` that names the
offending path and states the expected layout, instead of an ``IndexError`` deep inside a data loader
hours later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reidreg.errors import ReIDRegError

Sample = tuple[str, int, int]  # (img_path, pid, camid); camid 0-based

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JUNK_PID = -1
DISTRACTOR_PID = 0

# Market-1501 and DukeMTMC-reID names start with the pid (or "-1" for junk) followed by "_c<camera>"
# (torchreid's `([-\d]+)_c(\d)`, stricter about the sign). Matched against the file name only: a folder
# name containing "_c<digit>" must not change the result.
_MARKET_STYLE_NAME = re.compile(r"^(-?\d+)_c(\d)")

MARKET_SUBFOLDERS = ("bounding_box_train", "query", "bounding_box_test")
MSMT_LIST_FILES = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
# (train folder, test folder) of MSMT17_V1 and of MSMT17_V2, the latter with the faces masked.
MSMT_INNER_LAYOUTS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))


class DatasetError(ReIDRegError):
    """A dataset folder does not have the expected layout or contains a file that does not parse."""


@dataclass(frozen=True)
class ReIDDataset:
    """The three splits of a ReID dataset as lists of ``(img_path, pid, camid)``.

    ``train`` pids are the labels ``0..num_train_pids-1``; ``query``/``gallery`` pids are the original ones.
    ``num_cameras`` is one more than the largest camid of any split (the size a camera embedding needs).
    """

    name: str
    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    num_train_pids: int = field(init=False)
    num_cameras: int = field(init=False)

    def __post_init__(self) -> None:
        train_pids = {pid for _, pid, _ in self.train}
        if train_pids != set(range(len(train_pids))):
            first = sorted(train_pids)[:10]
            raise ValueError(f"{self.name}: train pids must be the labels 0..N-1, got {first}...")
        camids = [camid for split in (self.train, self.query, self.gallery) for _, _, camid in split]
        # frozen dataclass: derived fields are set once here, through object.__setattr__
        object.__setattr__(self, "num_train_pids", len(train_pids))
        object.__setattr__(self, "num_cameras", max(camids, default=-1) + 1)

    def summary(self) -> str:
        """A short table: subset | ids | images | cameras, one row per split."""
        rows = [("subset", "ids", "images", "cameras")]
        for subset, samples in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            rows.append(
                (
                    subset,
                    str(len({pid for _, pid, _ in samples})),
                    str(len(samples)),
                    str(len({camid for _, _, camid in samples})),
                )
            )
        widths = [max(len(row[col]) for row in rows) for col in range(4)]
        lines = [f"{self.name} ({self.root})"]
        for index, row in enumerate(rows):
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append(" | ".join(cells).rstrip())
            if index == 0:
                lines.append("-+-".join("-" * width for width in widths))
        return "\n".join(lines)


@dataclass(frozen=True)
class _MarketStyleSpec:
    """What distinguishes Market-1501-like datasets: folder names, cameras, an example file name."""

    folder_names: tuple[str, ...]
    num_cameras: int
    example_name: str

    def layout(self, dataset_folder: Path) -> str:
        return (
            f"expected {dataset_folder}/{{{','.join(MARKET_SUBFOLDERS)}}} "
            f"with files like {self.example_name} (cameras 1-{self.num_cameras})"
        )


MARKET1501 = _MarketStyleSpec(("Market-1501-v15.09.15", "Market-1501"), 6, "0002_c1s1_000451_03.jpg")
DUKEMTMC = _MarketStyleSpec(("DukeMTMC-reID",), 8, "0005_c2_f0046985.jpg")


def _locate(
    root: Path, folder_names: tuple[str, ...], is_dataset_folder: Callable[[Path], bool], layout: str
) -> Path:
    """The dataset folder: ``root`` itself, or the first known folder name found inside ``root``."""
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; {layout}")
    if root.name in folder_names or is_dataset_folder(root):
        return root.resolve()
    for folder_name in folder_names:
        if (root / folder_name).is_dir():
            return (root / folder_name).resolve()
    raise DatasetError(f"no dataset folder ({' or '.join(folder_names)}) found in {root}; {layout}")


def _image_names(folder: Path, layout: str) -> list[str]:
    """Sorted names of the image files in ``folder`` (sorted: os.scandir order is file-system dependent)."""
    if not folder.is_dir():
        raise DatasetError(f"missing folder {folder}; {layout}")
    with os.scandir(folder) as entries:
        return sorted(
            entry.name for entry in entries if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()
        )


def _parse_market_style_folder(folder: Path, num_cameras: int, layout: str) -> list[Sample]:
    """Samples of one Market-style folder with original pids; junk (pid −1) is dropped."""
    samples: list[Sample] = []
    for name in _image_names(folder, layout):
        match = _MARKET_STYLE_NAME.match(name)
        if match is None:
            raise DatasetError(f"cannot parse the file name {folder / name}; {layout}")
        pid, camera = int(match.group(1)), int(match.group(2))
        if pid == JUNK_PID:
            continue
        if pid < 0:
            raise DatasetError(f"negative pid other than -1 in {folder / name}; {layout}")
        if not 1 <= camera <= num_cameras:
            raise DatasetError(f"camera c{camera} outside 1-{num_cameras} in {folder / name}; {layout}")
        samples.append((str(folder / name), pid, camera - 1))
    if not samples:
        raise DatasetError(f"no usable images in {folder}; {layout}")
    return samples


def _relabel(samples: Iterable[Sample]) -> list[Sample]:
    """Map the pids to 0..N−1 in sorted order (training labels)."""
    samples = list(samples)
    label_of = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in samples}))}
    return [(path, label_of[pid], camid) for path, pid, camid in samples]


def _load_market_style(name: str, root: Path, spec: _MarketStyleSpec) -> ReIDDataset:
    layout = spec.layout(root / spec.folder_names[0])
    folder = _locate(root, spec.folder_names, lambda path: (path / MARKET_SUBFOLDERS[0]).is_dir(), layout)
    layout = spec.layout(folder)
    train, query, gallery = (
        _parse_market_style_folder(folder / subfolder, spec.num_cameras, layout)
        for subfolder in MARKET_SUBFOLDERS
    )
    # Distractors are gallery-only negatives: as a training class or as a query they would be meaningless.
    train = [sample for sample in train if sample[1] != DISTRACTOR_PID]
    query = [sample for sample in query if sample[1] != DISTRACTOR_PID]
    for split, subfolder in ((train, MARKET_SUBFOLDERS[0]), (query, MARKET_SUBFOLDERS[1])):
        if not split:
            raise DatasetError(f"only distractors (pid 0) in {folder / subfolder}; {layout}")
    return ReIDDataset(name=name, root=folder, train=_relabel(train), query=query, gallery=gallery)


MSMT_FOLDER_NAMES = ("MSMT17_V1", "MSMT17_V2", "MSMT17")
MSMT_NUM_CAMERAS = 15


def _msmt_layout(v1_folder: Path, v2_folder: Path) -> str:
    return (
        f"expected {v1_folder}/{{train,test}} or {v2_folder}/{{mask_train_v2,mask_test_v2}} "
        f"next to {','.join(MSMT_LIST_FILES)} with lines like '0000/0000_000_01_0303morning_0015_0.jpg 0' "
        f"(camera = third '_' field, 1-{MSMT_NUM_CAMERAS})"
    )


def _relative_image_paths(folder: Path) -> set[str]:
    """``"<pid folder>/<file>"`` of every image two levels below ``folder`` (to validate the list files)."""
    paths: set[str] = set()
    with os.scandir(folder) as subfolders:
        for subfolder in subfolders:
            if subfolder.is_dir():
                with os.scandir(subfolder.path) as entries:
                    paths.update(f"{subfolder.name}/{entry.name}" for entry in entries)
    return paths


def _parse_msmt_list(list_file: Path, image_folder: Path, existing: set[str], layout: str) -> list[Sample]:
    """Samples of one MSMT17 list file: pid from the label, camera from the third '_' field of the name."""
    if not list_file.is_file():
        raise DatasetError(f"missing list file {list_file}; {layout}")
    samples: list[Sample] = []
    for line_number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{line_number} ({line.strip()!r})"
        try:
            relative_path, label = line.split()
            pid = int(label)
            camera = int(relative_path.rsplit("/", 1)[-1].split("_")[2])
        except ValueError:
            raise DatasetError(f"cannot parse {where}; {layout}") from None
        except IndexError:
            raise DatasetError(f"cannot parse the file name in {where}; {layout}") from None
        if pid < 0:
            raise DatasetError(f"negative pid in {where}; {layout}")
        if not 1 <= camera <= MSMT_NUM_CAMERAS:
            raise DatasetError(f"camera {camera} outside 1-{MSMT_NUM_CAMERAS} in {where}; {layout}")
        if relative_path not in existing:
            missing = image_folder / relative_path
            raise DatasetError(f"{where} names {missing}, which does not exist; {layout}")
        samples.append((str(image_folder / relative_path), pid, camera - 1))
    if not samples:
        raise DatasetError(f"empty list file {list_file}; {layout}")
    return samples


def _load_msmt17(root: Path, *, combine_val: bool) -> ReIDDataset:
    layout = _msmt_layout(root / "MSMT17_V1", root / "MSMT17_V2")
    folder = _locate(root, MSMT_FOLDER_NAMES, lambda path: (path / MSMT_LIST_FILES[0]).is_file(), layout)
    layout = _msmt_layout(folder, folder)
    for train_name, test_name in MSMT_INNER_LAYOUTS:
        if (folder / train_name).is_dir() or (folder / test_name).is_dir():
            break
    else:
        raise DatasetError(f"neither train/test nor mask_train_v2/mask_test_v2 found in {folder}; {layout}")
    train_folder, test_folder = folder / train_name, folder / test_name
    for image_folder in (train_folder, test_folder):
        if not image_folder.is_dir():
            raise DatasetError(f"missing folder {image_folder}; {layout}")
    train_images, test_images = _relative_image_paths(train_folder), _relative_image_paths(test_folder)

    list_train, list_val, list_query, list_gallery = (folder / list_name for list_name in MSMT_LIST_FILES)
    train = _parse_msmt_list(list_train, train_folder, train_images, layout)
    if combine_val:
        # list_val holds other images of the training identities (same labels); AdaptiveReID trains on both.
        train += _parse_msmt_list(list_val, train_folder, train_images, layout)
    query = _parse_msmt_list(list_query, test_folder, test_images, layout)
    gallery = _parse_msmt_list(list_gallery, test_folder, test_images, layout)
    return ReIDDataset(name="msmt17", root=folder, train=_relabel(train), query=query, gallery=gallery)


def _load_synthetic(root: Path, options: dict[str, object]) -> ReIDDataset:
    # Imported here, not at module level: synthetic imports this module, and `python -m
    # reidreg.data.synthetic` must not find itself already imported by the package (runpy warns then).
    from reidreg.data.synthetic import generate_synthetic, resolve_synthetic_options

    resolved = resolve_synthetic_options(**options)  # type: ignore[arg-type]
    folder = root if root.name == resolved.folder_name else root / resolved.folder_name
    generate_synthetic(folder, **resolved.as_kwargs())
    spec = _MarketStyleSpec((resolved.folder_name,), resolved.num_cameras, "0001_c1s1_000001_01.jpg")
    return _load_market_style("synthetic", folder, spec)


# The options of the real datasets. The synthetic set's options are its generator's fields, checked by
# ``resolve_synthetic_options`` (listing them here too would be a second copy to keep in step).
_REAL_DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "market1501": (),
    "dukemtmc": (),
    "msmt17": ("combine_val",),
}
DATASET_NAMES: tuple[str, ...] = (*_REAL_DATASET_OPTIONS, "synthetic")


def build_dataset(name: str, root: str | Path, *, verbose: bool = True, **options: object) -> ReIDDataset:
    """Load dataset ``name`` from ``root`` (the dataset folder itself or a folder that contains it).

    Names: ``market1501``, ``dukemtmc``, ``msmt17`` (option ``combine_val: bool = False`` adds list_val to
    train) and ``synthetic`` (options: ``preset`` and the size options of
    :func:`reidreg.data.synthetic.generate_synthetic`; generated under ``root`` on first use).
    Raises ``ValueError`` for an unknown name or option and :class:`DatasetError` for layout problems.
    """
    key = name.lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    unknown = sorted(set(options) - set(_REAL_DATASET_OPTIONS[key])) if key != "synthetic" else []
    if unknown:
        allowed = ", ".join(_REAL_DATASET_OPTIONS[key]) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for dataset {key!r}; allowed: {allowed}")
    root = Path(root).expanduser()
    if key == "market1501":
        dataset = _load_market_style(key, root, MARKET1501)
    elif key == "dukemtmc":
        dataset = _load_market_style(key, root, DUKEMTMC)
    elif key == "msmt17":
        combine_val = options.get("combine_val", False)
        if not isinstance(combine_val, bool):
            raise ValueError(f"combine_val must be a bool, got {combine_val!r}")
        dataset = _load_msmt17(root, combine_val=combine_val)
    else:
        dataset = _load_synthetic(root, options)
    if verbose:
        print(dataset.summary())
    return dataset

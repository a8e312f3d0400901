"""Tests of the synthetic dataset: layout, determinism, atomic/concurrent generation and the CLI."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidreg.data import synthetic
from reidreg.data.datasets import build_dataset
from reidreg.data.synthetic import (
    COMPLETION_MARKER,
    SyntheticOptions,
    draw_identities,
    generate_synthetic,
    is_complete,
    main,
    resolve_synthetic_options,
    shows_named_identity,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = resolve_synthetic_options("tiny")


def generate_tiny(folder: Path, **overrides: int) -> Path:
    return generate_synthetic(folder, **resolve_synthetic_options("tiny", **overrides).as_kwargs())


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root folder holding the tiny preset, generated once for the read-only tests."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_tiny(root / TINY.folder_name)
    return root


def test_market_parser_reads_it_with_the_expected_counts(tiny_root: Path) -> None:
    dataset = build_dataset("synthetic", tiny_root, preset="tiny", verbose=False)
    folder = tiny_root / TINY.folder_name
    assert dataset.name == "synthetic"
    assert dataset.root == folder.resolve()
    num_test_ids = TINY.num_ids - TINY.num_train_ids
    assert dataset.num_train_pids == TINY.num_train_ids
    assert len(dataset.train) == TINY.num_train_ids * TINY.images_per_id
    assert (
        len(dataset.query) + len(dataset.gallery) == num_test_ids * TINY.images_per_id + TINY.num_distractors
    )
    assert dataset.num_cameras == TINY.num_cameras
    for path, _, _ in dataset.train[:3]:
        with Image.open(path) as image:
            assert image.size == (TINY.width, TINY.height) and image.mode == "RGB"
    # distractors are parsed into the gallery, junk is on disk but dropped by the parser
    assert sum(pid == 0 for _, pid, _ in dataset.gallery) == TINY.num_distractors
    junk = sorted((folder / "bounding_box_test").glob("-1_c*.jpg"))
    assert len(junk) == TINY.num_junk
    assert all(pid != -1 for split in (dataset.train, dataset.query, dataset.gallery) for _, pid, _ in split)


def test_query_gallery_split_follows_market(tiny_root: Path) -> None:
    dataset = build_dataset("synthetic", tiny_root, preset="tiny", verbose=False)
    gallery_cameras: dict[int, set[int]] = defaultdict(set)
    for _, pid, camid in dataset.gallery:
        gallery_cameras[pid].add(camid)
    query_cameras: dict[int, list[int]] = defaultdict(list)
    for _, pid, camid in dataset.query:
        query_cameras[pid].append(camid)
    test_pids = set(range(TINY.num_train_ids + 1, TINY.num_ids + 1))
    assert set(query_cameras) == test_pids
    for pid, cameras in query_cameras.items():
        assert len(cameras) == len(set(cameras)) >= 2  # at most one query per camera, ≥ 2 cameras
        # every query has a true match in another camera
        assert all(gallery_cameras[pid] - {camid} for camid in cameras)
    train_pid_names = {int(Path(path).name[:4]) for path, _, _ in dataset.train}
    assert train_pid_names.isdisjoint(test_pids)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, tiny_root: Path) -> None:
    reference = tiny_root / TINY.folder_name
    again = generate_tiny(tmp_path / "again")
    assert listing(again) == listing(reference)
    for name in listing(reference):
        assert (again / name).read_bytes() == (reference / name).read_bytes(), name
    other = generate_tiny(tmp_path / "other", seed=1)
    images = [name for name in listing(reference) if name.endswith(".jpg")]
    shared = set(images) & set(listing(other))
    assert sum((other / name).read_bytes() == (reference / name).read_bytes() for name in shared) == 0


def test_images_are_not_trivially_identical(tiny_root: Path) -> None:
    """Images of one identity vary (camera, pose, occlusion); images differ across identities."""
    train = sorted((tiny_root / TINY.folder_name / "bounding_box_train").glob("0001_*.jpg"))
    pixels = [np.asarray(Image.open(path), dtype=np.float32) for path in train]
    for first, second in itertools.combinations(pixels, 2):
        assert np.abs(first - second).mean() > 1.0


def test_identities_share_attributes() -> None:
    """Many identities differ from another one in at most two attribute groups (hard negatives)."""
    identities = draw_identities(200, seed=0)
    keys = list(identities[0])

    def same(first: dict[str, object], second: dict[str, object]) -> int:
        return sum(np.array_equal(np.asarray(first[key]), np.asarray(second[key])) for key in keys)

    near_copies = sum(
        any(same(identity, other) >= len(keys) - 10 for other in identities[:index])
        for index, identity in enumerate(identities)
    )
    assert near_copies >= 60
    # pure colour lookup does not work: many identities share the upper and the lower palette colour
    upper_lower = [
        (tuple(np.round(i["upper_rgb"], 1)), tuple(np.round(i["lower_rgb"], 1))) for i in identities
    ]
    assert len(set(upper_lower)) < 0.8 * len(identities)


def test_label_noise_redraws_only_the_chosen_training_images(tmp_path: Path, tiny_root: Path) -> None:
    """Mislabeled training images show another training identity; every other file keeps its bytes."""
    clean = tiny_root / TINY.folder_name
    noisy = generate_tiny(tmp_path / "noisy", mislabeled_percent=40)
    assert listing(noisy) == listing(clean)  # the same names: the labels do not say which are wrong
    train = [name for name in listing(clean) if name.startswith("bounding_box_train/")]
    images = [name for name in listing(clean) if name.endswith(".jpg")]
    changed = {name for name in images if (noisy / name).read_bytes() != (clean / name).read_bytes()}
    assert changed <= set(train)
    assert 0.2 * len(train) <= len(changed) <= 0.6 * len(train)

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.float32)

    # a mislabeled image is the same draw (pose, camera, background) of another training pid's person
    num_train = TINY.num_train_ids
    for name in sorted(changed):
        pid, index = int(Path(name).name[:4]), (int(Path(name).name.split("_")[2]) - 1) // 25
        shown = synthetic._shown_identity(TINY.seed, pid, index, num_train, 40)
        assert shown != pid and 1 <= shown <= num_train
        assert np.abs(pixels(noisy / name) - pixels(clean / name)).mean() > 1.0
    # the truth read back from the names is exactly the set of redrawn images
    options = resolve_synthetic_options("tiny", mislabeled_percent=40)
    assert {name for name in train if not shows_named_identity(noisy / name, options)} == changed
    # over many images the drawn share matches the option (25 % of 2,000 draws)
    draws = [synthetic._shown_identity(0, pid, index, 50, 25) for pid in range(1, 51) for index in range(40)]
    assert (
        0.22
        < np.mean([shown != pid for shown, pid in zip(draws, np.repeat(range(1, 51), 40), strict=True)])
        < 0.28
    )


def test_partial_folder_without_marker_is_regenerated(tmp_path: Path, tiny_root: Path) -> None:
    folder = tmp_path / TINY.folder_name
    (folder / "bounding_box_train").mkdir(parents=True)
    (folder / "bounding_box_train" / "0001_c1s1_000001_01.jpg").write_bytes(b"truncated")
    assert not is_complete(folder)
    dataset = build_dataset("synthetic", tmp_path, preset="tiny", verbose=False)
    assert is_complete(folder)
    assert listing(folder) == listing(tiny_root / TINY.folder_name)
    assert len(dataset.train) == TINY.num_train_ids * TINY.images_per_id
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name or ".stale-" in path.name]


def test_complete_folder_is_reused(tmp_path: Path) -> None:
    folder = generate_tiny(tmp_path / "data")
    marker_time = (folder / COMPLETION_MARKER).stat().st_mtime_ns
    assert generate_tiny(tmp_path / "data") == folder
    assert (folder / COMPLETION_MARKER).stat().st_mtime_ns == marker_time


def test_loser_of_the_rename_race_keeps_the_winner(tmp_path: Path) -> None:
    winner = generate_tiny(tmp_path / "data")
    loser = tmp_path / ".data.tmp-loser"
    (loser / "bounding_box_train").mkdir(parents=True)
    (loser / COMPLETION_MARKER).write_text("{}")
    synthetic._publish(loser, winner)
    assert json_marker(winner)["seed"] == TINY.seed  # the winner's folder is untouched
    assert loser.exists()  # left for its generator to delete


def json_marker(folder: Path) -> dict[str, int]:
    return json.loads((folder / COMPLETION_MARKER).read_text())


def test_concurrent_generators(tmp_path: Path, tiny_root: Path) -> None:
    """Two generators of the same folder at once (think: two DDP ranks): one folder, nothing left over."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        folders = list(pool.map(lambda _: generate_tiny(tmp_path / TINY.folder_name), range(2)))
    assert folders == [tmp_path / TINY.folder_name] * 2
    assert listing(tmp_path / TINY.folder_name) == listing(tiny_root / TINY.folder_name)
    leftovers = [path.name for path in tmp_path.iterdir() if path.name != TINY.folder_name]
    assert leftovers == [f".{TINY.folder_name}.lock"]


def test_cli_module(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "reidreg.data.synthetic", "--out", str(tmp_path), "--preset", "tiny"]
    command += ["--num-ids", "4", "--images-per-id", "4"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    folder = tmp_path / resolve_synthetic_options("tiny", num_ids=4, images_per_id=4).folder_name
    assert f"synthetic dataset ready at {folder}" in result.stdout
    # reidreg.data must not import the synthetic module itself, or runpy warns about running it twice
    assert "RuntimeWarning" not in result.stderr
    assert is_complete(folder)


def test_cli_options_override_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = main(
        ["--out", str(tmp_path), "--preset", "tiny", "--num-ids", "4", "--seed", "3", "--num-junk", "0"]
    )
    expected = resolve_synthetic_options("tiny", num_ids=4, seed=3, num_junk=0)
    assert folder == tmp_path / expected.folder_name
    assert "synthetic dataset ready" in capsys.readouterr().out
    dataset = build_dataset("synthetic", folder, verbose=False, preset="tiny", num_ids=4, seed=3, num_junk=0)
    assert dataset.num_train_pids == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num-cameras", "12"])


def test_option_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_cameras must be in 2..9"):
        SyntheticOptions(num_cameras=10)
    with pytest.raises(ValueError, match="images_per_id must be >= 4"):
        SyntheticOptions(images_per_id=3)
    with pytest.raises(ValueError, match="seed must be an int"):
        SyntheticOptions(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mislabeled_percent must be in 0..99"):
        SyntheticOptions(mislabeled_percent=100)
    with pytest.raises(ValueError, match="label noise needs 2 training ids"):
        SyntheticOptions(num_ids=3, mislabeled_percent=10)
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        resolve_synthetic_options("huge")
    with pytest.raises(ValueError, match="unknown synthetic option.*num_idz.*allowed: preset, num_ids"):
        build_dataset("synthetic", tmp_path, num_idz=3)
    assert not list(tmp_path.iterdir())


def test_folder_name_encodes_every_option() -> None:
    names = {SyntheticOptions().folder_name}
    for option, value in {
        "num_ids": 10,
        "num_cameras": 3,
        "images_per_id": 8,
        "height": 64,
        "width": 32,
        "seed": 1,
        "num_distractors": 0,
        "num_junk": 0,
        "mislabeled_percent": 20,
    }.items():
        names.add(SyntheticOptions(**{option: value}).folder_name)
    assert len(names) == 10
    assert SyntheticOptions(mislabeled_percent=20).folder_name.endswith("-s0-m20")
    assert SyntheticOptions().folder_name == "synthetic-v1-i200-c4-n16-128x64-d100-j50-s0"
    assert SyntheticOptions(num_ids=16).folder_name == "synthetic-v1-i16-c4-n16-128x64-d8-j4-s0"
    assert resolve_synthetic_options("tiny", num_ids=20).num_distractors == 10


UMASK_MODES = [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)]  # (umask, folder mode, file mode)


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), UMASK_MODES)
def test_published_tree_follows_the_umask(
    tmp_path: Path, umask: int, folder_mode: int, file_mode: int
) -> None:
    """Teammates sharing REIDREG_DATA can read (umask 022) or also write (umask 002) the generated data."""
    previous = os.umask(umask)
    try:
        folder = generate_tiny(tmp_path / TINY.folder_name)
    finally:
        os.umask(previous)
    paths = [folder, *folder.rglob("*"), tmp_path / f".{TINY.folder_name}.lock"]
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in paths}
    expected = {name: folder_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
    assert modes == expected
    assert len(modes) > 80  # the folder, its 3 subfolders, the marker, the images and the lock file


# A generator that stops after its first image and waits, as if killed or still running, holding the lock.
STALLING_GENERATOR = """
import sys, time
from reidreg.data import synthetic
save = synthetic._save
def save_then_stall(*args):
    save(*args)
    print("stalled", flush=True)
    time.sleep(600)
synthetic._save = save_then_stall
synthetic.generate_synthetic(sys.argv[1], **synthetic.resolve_synthetic_options("tiny").as_kwargs())
"""


@contextlib.contextmanager
def stalled_generator(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """A generator of ``folder`` in another process, stopped midway with its temporary folder and lock."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", STALLING_GENERATOR, str(folder)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "stalled\n"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


def temporary_folders(root: Path) -> list[Path]:
    return [path for path in root.iterdir() if ".tmp-" in path.name]


def test_next_generation_removes_the_leftovers_of_a_killed_one(tmp_path: Path, tiny_root: Path) -> None:
    folder = tmp_path / TINY.folder_name
    with stalled_generator(folder) as process:
        (leftover,) = temporary_folders(tmp_path)
        assert list(leftover.rglob("*.jpg"))  # it wrote an image before it stalled
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    assert generate_tiny(folder) == folder
    assert listing(folder) == listing(tiny_root / TINY.folder_name)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f".{TINY.folder_name}.lock", TINY.folder_name]


def test_the_temporary_folder_of_a_running_generation_is_kept(tmp_path: Path) -> None:
    """A second generator waits for the lock; it does not touch the running one's temporary folder."""
    folder = tmp_path / TINY.folder_name
    with ThreadPoolExecutor(max_workers=1) as pool:
        with stalled_generator(folder):
            (running,) = temporary_folders(tmp_path)
            second = pool.submit(generate_tiny, folder)
            time.sleep(1.0)  # time enough for the second generator to reach the lock
            assert not second.done()
            assert running.is_dir() and list(running.rglob("*.jpg"))
        # the first generator was killed on leaving the block: the second one takes over and cleans up
        assert second.result(timeout=120) == folder and is_complete(folder)
    assert not temporary_folders(tmp_path)

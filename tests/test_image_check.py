"""Tests of the image check (reidreg.data.image_check) and of one-line worker errors (reidreg.errors)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from reidreg.data.datasets import DatasetError
from reidreg.data.image_check import VerifyResult, verify_images
from reidreg.errors import one_line


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (32, 64)) -> bytes:
    """A valid JPEG of random pixels (noise: no two seeds give the same bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A dataset folder ``data/set`` of 6 valid images in two subfolders (one of them a PNG)."""
    root = tmp_path / "data" / "set"
    for index in range(6):
        folder = root / ("train" if index < 4 else "test")
        folder.mkdir(parents=True, exist_ok=True)
        if index == 5:
            Image.fromarray(np.full((64, 32, 3), 200, dtype=np.uint8)).save(folder / f"{index}.png")
        else:
            (folder / f"{index}.jpg").write_bytes(jpeg_bytes(index))
    return root


def images(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix in (".jpg", ".png"))


def verify(root: Path, paths: list[Path] | None = None, **options: object) -> VerifyResult:
    cache_dir = options.pop("cache_dir", root.parent / ".reidreg-cache")
    options = {"workers": 2, "progress": False, **options}
    return verify_images(images(root) if paths is None else paths, root=root, cache_dir=cache_dir, **options)


def test_valid_folder_passes_and_the_second_run_uses_the_cache(dataset: Path) -> None:
    first = verify(dataset)
    assert (first.total, first.read, first.cached) == (6, 6, 0)
    assert first.cache_file == dataset.parent / ".reidreg-cache" / "set.json"
    manifest = json.loads(first.cache_file.read_text())["images"]
    assert sorted(manifest) == [
        "test/4.jpg",
        "test/5.png",
        "train/0.jpg",
        "train/1.jpg",
        "train/2.jpg",
        "train/3.jpg",
    ]
    second = verify(dataset)
    assert (second.total, second.read, second.cached) == (6, 0, 6)


def test_the_cache_survives_moving_the_data_folder(dataset: Path, tmp_path: Path) -> None:
    verify(dataset)
    moved = tmp_path / "elsewhere" / "set"
    shutil.copytree(dataset.parent, moved.parent, copy_function=shutil.copy2)  # copy2 keeps the mtimes
    assert verify(moved).cached == 6


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


BROKEN_FILES = {
    "truncated JPEG": (
        lambda path: (path.write_bytes(jpeg_bytes(9)), truncate(path)),
        "corrupt or truncated image",
    ),
    "empty file": (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    "text named .jpg": (lambda path: path.write_text("not a picture\n"), "not an image PIL can identify"),
    "missing file": (lambda path: None, "file not found"),
    "folder named .jpg": (lambda path: path.mkdir(), "not a regular file"),
}


@pytest.mark.parametrize("kind", list(BROKEN_FILES))
def test_a_broken_file_is_one_error_line_naming_it(dataset: Path, kind: str) -> None:
    make, problem = BROKEN_FILES[kind]
    broken = dataset / "train" / "broken.jpg"
    make(broken)
    with pytest.raises(DatasetError) as error:
        verify(dataset, [*images(dataset), broken])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"broken image {broken}: {problem}")
    if kind == "truncated JPEG":
        assert "image file is truncated" in message


def test_several_broken_files_are_counted_and_the_first_few_listed(dataset: Path) -> None:
    broken = [dataset / "test" / f"empty{index}.jpg" for index in range(8)]
    for path in broken:
        path.write_bytes(b"")
    with pytest.raises(DatasetError) as error:
        verify(dataset, [*images(dataset), *broken])
    message = str(error.value)
    assert message.startswith(f"broken image {broken[0]}: empty file (0 bytes); 7 more of the 14 images")
    assert all(str(path) in message for path in broken[1:6])
    assert str(broken[6]) not in message and message.endswith(
        "and 2 more. Replace or remove the broken files before training."
    )


def test_good_images_are_cached_even_when_some_are_broken(dataset: Path) -> None:
    broken = dataset / "test" / "broken.jpg"
    broken.write_text("oops")
    with pytest.raises(DatasetError):
        verify(dataset)
    broken.write_bytes(jpeg_bytes(7))  # fixed: only this file is decoded again
    result = verify(dataset)
    assert (result.read, result.cached) == (1, 6)


def test_a_modified_file_is_verified_again(dataset: Path) -> None:
    verify(dataset)
    truncate(dataset / "train" / "2.jpg")
    with pytest.raises(DatasetError, match=r"broken image .*2\.jpg: corrupt or truncated image"):
        verify(dataset)
    (dataset / "train" / "2.jpg").write_bytes(jpeg_bytes(2))
    assert verify(dataset).read == 1
    # same size, other modification time (e.g. rewritten in place): verified again
    status = (dataset / "train" / "3.jpg").stat()
    os.utime(dataset / "train" / "3.jpg", ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert verify(dataset).read == 1
    assert verify(dataset).read == 0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` refuses new entries: chmod 555, and for root (whom chmod does not stop) chattr +i."""
    folder.chmod(0o555)
    immutable = False
    try:
        probe = folder / ".write-probe"
        with contextlib.suppress(OSError):
            probe.touch()
        if probe.exists():
            probe.unlink()
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("running as root and chattr +i is refused: cannot make a read-only folder")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr") or "chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_data_folder_verifies_without_caching(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with read_only(dataset.parent):
        for _ in range(2):
            result = verify(dataset)
            assert (result.read, result.cached, result.cache_file) == (6, 0, None)
            note = capsys.readouterr().err
            assert note.count("\n") == 1 and "cannot write the image check cache" in note
            assert str(dataset.parent / ".reidreg-cache" / "set.json") in note
            assert "checked without caching" in note and result.summary().endswith("; not cached")
    assert not (dataset.parent / ".reidreg-cache").exists()


def test_read_only_cache_is_still_used(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_dir = dataset.parent / ".reidreg-cache"
    verify(dataset)
    with read_only(cache_dir):
        result = verify(dataset)
        assert (result.read, result.cached, result.cache_problem) == (0, 6, None)
        (dataset / "train" / "1.jpg").write_bytes(jpeg_bytes(11))
        result = verify(dataset)
        assert (result.read, result.cached, result.cache_file) == (1, 5, None)
    assert "cannot write the image check cache" in capsys.readouterr().err


def test_a_corrupt_cache_is_ignored(dataset: Path) -> None:
    cache_file = verify(dataset).cache_file
    assert cache_file is not None
    cache_file.write_text('{"version": 1, "images": {"train/0.jpg": "garbage"')
    assert verify(dataset).read == 6
    assert verify(dataset).read == 0


def test_without_a_cache_dir_everything_is_decoded(dataset: Path) -> None:
    for _ in range(2):
        result = verify(dataset, cache_dir=None)
        assert (result.read, result.cache_file) == (6, None)
    assert not (dataset.parent / ".reidreg-cache").exists()


def test_truncated_images_are_caught_even_if_pil_was_told_to_load_them(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truncate(dataset / "train" / "0.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(dataset / "train" / "0.jpg") as image:
        image.load()  # what PIL does with the flag on: the missing rows are silently filled
    with pytest.raises(DatasetError, match="image file is truncated"):
        verify(dataset)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_the_training_stack_does_not_enable_truncated_images() -> None:
    import reidreg.data.datamodule  # noqa: F401  (imports torch, torchvision, Lightning)
    import reidreg.train  # noqa: F401  (imports timm and the models)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_progress_prints_one_summary_line_when_stdout_is_not_a_terminal(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify(dataset, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("image check: 6 images OK (6 decoded, 0 unchanged")
    verify(dataset, progress=False)
    assert capsys.readouterr().out == ""


def test_one_line_recovers_the_message_of_a_loader_worker_error(dataset: Path) -> None:
    from torch.utils.data import DataLoader

    from reidreg.data.datamodule import EvalImages, read_image
    from reidreg.data.transforms import build_test_transform

    broken = dataset / "train" / "1.jpg"
    truncate(broken)
    with pytest.raises(DatasetError) as direct:
        read_image(str(broken))
    samples = [(str(path), 1, 0) for path in images(dataset)]
    loader = DataLoader(EvalImages(samples, [], build_test_transform(height=64, width=32)), num_workers=2)
    with pytest.raises(DatasetError) as wrapped:
        list(loader)
    assert str(wrapped.value).startswith("Caught DatasetError in DataLoader worker process ")
    assert str(wrapped.value).count("\n") > 10
    assert one_line(wrapped.value) == str(direct.value)
    assert str(broken) in one_line(wrapped.value) and "image file is truncated" in one_line(wrapped.value)


def test_one_line_of_other_errors() -> None:
    assert one_line(DatasetError("missing folder /x")) == "missing folder /x"
    assert one_line(ValueError("first\n  second")) == "first second"
    fake = "Caught KeyError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    fake += "  File \"x.py\", line 1, in f\nKeyError: 'pid'\n"
    assert one_line(RuntimeError(fake)) == "'pid'"


def test_images_far_below_the_training_size_are_named_in_one_warning(
    dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny, thin = dataset / "train" / "tiny.png", dataset / "test" / "thin.png"
    Image.new("RGB", (1, 1)).save(tiny)  # (width, height)
    Image.new("RGB", (31, 200)).save(thin)  # tall enough, too narrow: below 128 / 4 = 32
    paths = images(dataset)
    for cached in (0, 8):  # the sizes come from the cache on the second run
        caplog.clear()
        result = verify(dataset, paths, training_size=(256, 128))  # the others are 64x32: not below 64x32
        assert result.cached == cached
        assert result.small_images == ((str(thin), 200, 31), (str(tiny), 1, 1))
        warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
        assert warnings == [
            "2 of the 8 images are smaller than 1/4 of the training size 256x128 (height x width) and will "
            f"be stretched more than 4x: {thin} (200x31), {tiny} (1x1)"
        ]
    assert verify(dataset, paths, training_size=(64, 32)).small_images == ((str(tiny), 1, 1),)


def expected_content_hash(root: Path, paths: list[Path]) -> str:
    """The documented definition, computed independently: SHA-256 over the sorted (relative path, NUL,
    SHA-256 of the bytes)."""
    combined = hashlib.sha256()
    for relative in sorted(path.relative_to(root).as_posix() for path in paths):
        combined.update(relative.encode() + b"\0" + hashlib.sha256((root / relative).read_bytes()).digest())
    return combined.hexdigest()


def test_the_content_hash_is_that_of_the_bytes_and_costs_nothing_the_second_time(
    dataset: Path, tmp_path: Path
) -> None:
    expected = expected_content_hash(dataset, images(dataset))
    cold, warm = verify(dataset), verify(dataset)
    assert (cold.read, warm.read) == (6, 0)
    assert cold.content_hash == warm.content_hash == expected
    assert verify(dataset, images(dataset)[::-1], cache_dir=None).content_hash == expected  # order
    assert verify(dataset, decode=False, cache_dir=None).content_hash == expected  # check off: hashed
    moved = tmp_path / "elsewhere" / "set"
    shutil.copytree(dataset, moved)
    assert verify(moved, cache_dir=None).content_hash == expected  # relative paths: location-free

    (dataset / "test" / "4.jpg").rename(dataset / "test" / "4b.jpg")
    renamed = verify(dataset)
    assert renamed.content_hash == expected_content_hash(dataset, images(dataset)) != expected


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_changed_byte_changes_the_content_hash(dataset: Path) -> None:
    """Files are re-read when their size or mtime changed; a same-size rewrite that restores the old mtime
    is not noticed (the documented quick-check limit) until the cache file is deleted."""
    before = verify(dataset)
    target = dataset / "train" / "0.jpg"
    status = target.stat()
    flip_one_byte(target)
    assert target.stat().st_size == status.st_size
    changed = verify(dataset)
    assert changed.read == 1 and changed.content_hash != before.content_hash
    assert changed.content_hash == expected_content_hash(dataset, images(dataset))

    status = target.stat()
    flip_one_byte(target)  # back to the original bytes, with the size and mtime the cache holds
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
    stale = verify(dataset)
    assert stale.read == 0 and stale.content_hash == changed.content_hash  # not noticed: documented
    assert before.cache_file is not None
    before.cache_file.unlink()
    assert verify(dataset).content_hash == before.content_hash


def test_with_the_check_off_images_are_hashed_not_decoded(dataset: Path) -> None:
    truncate(dataset / "train" / "1.jpg")
    hashed = verify(dataset, decode=False)
    assert (hashed.read, hashed.decode) == (6, False)
    assert hashed.summary().startswith("image hash (image check off): 6 images (6 read, 0 unchanged")
    assert verify(dataset, decode=False).read == 0  # cached
    with pytest.raises(DatasetError, match=r"broken image .*1\.jpg: corrupt or truncated"):
        verify(dataset)  # hashed-only entries are not taken as verified


@pytest.mark.parametrize("check", [True, False])
def test_the_data_module_exposes_the_content_hash(tmp_path: Path, check: bool) -> None:
    from reidreg.data.datamodule import ReIDDataModule

    options = {"preset": "tiny"}
    data = ReIDDataModule(
        dataset="synthetic",
        root=str(tmp_path),
        dataset_options=options,
        height=64,
        width=32,
        val_identities=0,
        verify_images=check,
    )
    assert data.content_hash is None
    data.verify_images()
    dataset = data.load()
    paths = [Path(path) for split in (dataset.train, dataset.query, dataset.gallery) for path, _, _ in split]
    assert data.content_hash == expected_content_hash(dataset.root, paths)

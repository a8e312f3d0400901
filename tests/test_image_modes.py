"""Every PIL mode a ReID folder can hold: converted to the right 8-bit RGB by every loader, or refused by
the image check (reidreg.data.image_modes, reidreg.data.image_check)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reidreg.data.datamodule import ReIDDataModule, read_image
from reidreg.data.datasets import DatasetError
from reidreg.data.image_cache import ImageCache, MemoryBudget
from reidreg.data.image_check import verify_images
from reidreg.data.image_modes import ALPHA_BACKGROUND, to_rgb
from reidreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform
from reidreg.deploy.image_files import ImageFiles

H, W = 32, 16
SIZE = (W, H)  # PIL's (width, height)
PLENTY = MemoryBudget(available=64 * 2**30, shared=None)


def over_background(colour: tuple[int, ...], alpha: int) -> tuple[float, ...]:
    """``colour`` with opacity ``alpha`` (0-255) over ``ALPHA_BACKGROUND``."""
    return tuple((c * alpha + b * (255 - alpha)) / 255 for c, b in zip(colour, ALPHA_BACKGROUND, strict=True))


def palette(transparency: bytes | None) -> Image.Image:
    image = Image.new("P", SIZE, 1)
    image.putpalette([0, 0, 0, 200, 30, 60])
    if transparency is not None:
        image.info["transparency"] = transparency  # PNG tRNS: alpha of palette entries 0 and 1
    return image


def sixteen_bit(mode: str, value: int) -> Image.Image:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, SIZE, np.full((H, W), value, dtype=dtype).tobytes())


# name: (image, format written, mode PIL reads back, expected RGB, tolerance). TIFF content is stored
# under a .png name: PIL identifies a file by its bytes, so a dataset folder can hold it that way.
MODES: dict[str, tuple[Image.Image, str, str, tuple[float, ...], float]] = {
    "1": (Image.new("1", SIZE, 1), "PNG", "1", (255, 255, 255), 0),
    "L": (Image.new("L", SIZE, 77), "PNG", "L", (77, 77, 77), 0),
    "RGB": (Image.new("RGB", SIZE, (10, 120, 250)), "PNG", "RGB", (10, 120, 250), 0),
    "P": (palette(None), "PNG", "P", (200, 30, 60), 0),
    "P_transparency": (palette(b"\xff\x80"), "PNG", "P", over_background((200, 30, 60), 0x80), 1),
    "LA": (Image.new("LA", SIZE, (200, 0)), "PNG", "LA", ALPHA_BACKGROUND, 0),
    "RGBA": (
        Image.new("RGBA", SIZE, (10, 200, 90, 128)),
        "PNG",
        "RGBA",
        over_background((10, 200, 90), 128),
        1,
    ),
    "CMYK": (Image.new("CMYK", SIZE, (0, 128, 255, 64)), "JPEG", "CMYK", (191, 95.1, 0), 3),
    "YCbCr": (Image.new("RGB", SIZE, (10, 20, 30)).convert("YCbCr"), "TIFF", "YCbCr", (10, 20, 30), 3),
    "I16": (sixteen_bit("I;16", 32768), "PNG", "I;16", (128, 128, 128), 0),  # not 255: scaled, not clipped
    "I16B": (sixteen_bit("I;16B", 257 * 200), "TIFF", "I;16B", (200, 200, 200), 0),
}
REFUSED = {
    "I": Image.fromarray(np.full((H, W), 70000, dtype=np.int32), "I"),
    "F": Image.fromarray(np.full((H, W), 0.5, dtype=np.float32), "F"),
}


def write_market(root: Path, images: dict[str, Image.Image], formats: dict[str, str]) -> dict[str, str]:
    """A Market-1501 folder with each image as a training image (c1), a query (c1) and a gallery image
    (c2) of its own identity; returns {file name: image name}."""
    names = {}
    for pid, (name, image) in enumerate(images.items(), start=1):
        suffix = ".jpg" if formats[name] == "JPEG" else ".png"
        for folder, camera in (("bounding_box_train", 1), ("query", 1), ("bounding_box_test", 2)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            file_name = f"{pid:04d}_c{camera}s1_000001_00{suffix}"
            image.save(root / folder / file_name, format=formats[name])
            names[file_name] = name
    return names


def uint8_of(normalised: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised image → (H, W, 3) pixel values, the inverse of the test transform."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (normalised * std + mean).mul(255).permute(1, 2, 0).numpy()


def assert_pixels(pixels: np.ndarray, name: str) -> None:
    """Every pixel of ``pixels`` (H, W, 3) is within the tolerance of the expected colour of ``name``."""
    _, _, _, expected, tolerance = MODES[name]
    error = np.abs(pixels.astype(np.float64) - np.array(expected)).max()
    assert error <= tolerance + 0.51, f"{name}: pixels {pixels[0, 0]} expected {expected}"


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("modes") / "Market-1501"
    names = write_market(root, {n: v[0] for n, v in MODES.items()}, {n: v[1] for n, v in MODES.items()})
    for path in root.rglob("*_c1s1_*"):
        with Image.open(path) as image:
            assert image.mode == MODES[names[path.name]][2], path.name  # the file holds that mode
    return root, names


def test_every_mode_is_converted_the_same_way_by_every_loader(market: tuple[Path, dict[str, str]]) -> None:
    root, names = market
    data = ReIDDataModule(
        dataset="market1501",
        root=str(root),
        height=H,
        width=W,
        hflip=False,
        pad_crop=False,
        random_erasing=False,
        num_identities=2,
        num_instances=2,
        val_identities=0,
        batch_size_test=4,
        num_workers=2,
        pipeline="cpu",
    )
    data.verify_images()  # the real image check: every mode passes
    assert data.content_hash is not None

    # evaluation: query and gallery through the test loader's workers
    dataset = data.load()
    canonical = [*dataset.query, *dataset.gallery]
    seen = 0
    for images, _, _, _, indices in data.test_dataloader():
        for image, index in zip(images, indices.tolist(), strict=True):
            assert_pixels(uint8_of(image), names[Path(canonical[index][0]).name])
            seen += 1
    assert seen == 2 * len(MODES)

    # training, per-image path (augmentations off: the test transform's pixels), every image once
    label_name = {label: names[Path(path).name] for path, label, _ in data.train_samples}
    train_images = data.train_dataloader().dataset
    keys = [(index, 0) for index in range(len(train_images))]
    seen_labels = []
    for images, labels in DataLoader(train_images, sampler=keys, batch_size=4, num_workers=2):
        for image, label in zip(images, labels.tolist(), strict=True):
            assert_pixels(uint8_of(image), label_name[label])
            seen_labels.append(label)
    assert sorted(seen_labels) == sorted(label_name)

    # training, the GPU pipeline's decoded-image cache
    paths = [path for path, _, _ in data.train_samples]
    cache = ImageCache.build(paths, height=H, width=W, read=read_image, num_threads=2, budget=PLENTY)
    for path, pixels in zip(paths, cache.images, strict=True):
        assert_pixels(pixels.permute(1, 2, 0).numpy(), names[Path(path).name])

    # reidreg.extract / reidreg.export: the deploy loader
    files = ImageFiles([Path(p) for p in paths], build_test_transform(height=H, width=W), height=H, width=W)
    for (images, errors), path in zip(DataLoader(files, num_workers=2), paths, strict=True):
        assert list(errors) == [""]
        assert_pixels(uint8_of(images[0]), names[Path(path).name])


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(mode: str) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb == rgb[..., :1]).all()


@pytest.mark.parametrize("mode", list(REFUSED))
def test_the_image_check_refuses_32_bit_modes_in_one_line(mode: str, tmp_path: Path) -> None:
    root = tmp_path / "set"
    root.mkdir()
    good, bad = root / "good.png", root / f"{mode}.png"
    Image.new("RGB", SIZE).save(good)
    REFUSED[mode].save(bad, format="TIFF")
    with pytest.raises(DatasetError) as error:
        verify_images([good, bad], root=root, cache_dir=None, workers=2, progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"broken image {bad}: unsupported pixel mode {mode} (32-bit ")
    # without the check, the loader refuses it too, naming the file
    with pytest.raises(DatasetError, match=rf"cannot read image '{bad}': unsupported pixel mode {mode} "):
        read_image(str(bad))


def test_a_mode_without_a_conversion_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported pixel mode HSV .no defined conversion"):
        to_rgb(Image.new("HSV", SIZE))


@pytest.mark.parametrize("make", [lambda: Image.new("RGB", SIZE, (1, 2, 3)), lambda: palette(None)])
def test_to_rgb_returns_a_new_image(make: Callable[[], Image.Image]) -> None:
    image = make()
    converted = to_rgb(image)
    assert converted is not image and converted.mode == "RGB"

"""A synthetic multi-camera pedestrian dataset in the Market-1501 layout: the embedded default of reidreg.

Why: the pipeline, the regularizers and the evaluation must run end to end (CI, CPU quickstart, DDP smoke
tests) without downloading Market-1501. The data must still pose a real ReID problem, otherwise a broken
model or metric would look fine. So:

* identities are composed from shared attribute vocabularies (clothing colours and patterns, sleeves,
  trousers/shorts/skirt, bag, hair, skin tone, body proportions) drawn from skewed distributions, and half
  of them are near-copies of an earlier identity with one or two attribute groups changed — many pairs of
  identities differ in one detail only (hard negatives);
* every camera has its own colour cast, brightness/contrast, noise, resolution, blur, JPEG quality, person
  scale, offset, shear, typical viewpoints (front/back/side, which changes what a backpack or long hair
  looks like) and background texture; every image adds pose and lighting jitter, mirroring and, often,
  an occluder covering part of the body;
* the gallery contains distractors (pid 0, other people) and junk (pid −1, background and fragments).

Query/gallery follow Market-1501: for each test identity one query image per camera it appears in, the
rest in the gallery; every identity appears in ≥ 2 cameras with ≥ 2 images each, so every query has a
gallery match in another camera.

Generation is deterministic: each image has its own ``np.random.Generator`` seeded from (seed, stream, pid,
index), so the same options give the same bytes and images could be drawn in any order. It is written
atomically: into a temporary sibling folder, completed by a marker file, then renamed into place; a folder
without the marker is never used. Concurrent generators (DDP ranks) serialise on a lock file where the
file system supports it; otherwise the loser of the rename race uses the winner's folder. The generator
holding the lock first deletes the temporary folders of killed generators. Folders and files get the
permissions of the umask (e.g. 0755/0644), so a data folder can be shared by a team (umask 002: writable
by the group).

CLI: ``python -m reidreg.data.synthetic --out DIR [--preset tiny] [--num-ids 200 ...]`` writes
``DIR/<folder_name>``, the folder ``build_dataset("synthetic", DIR, ...)`` reads with the same options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from reidreg.data.datasets import MARKET_SUBFOLDERS
from reidreg.utils.file_lock import exclusive_lock

log = logging.getLogger(__name__)

# Part of the folder name: bump it whenever the drawn images change, so that stale data is not reused.
GENERATOR_VERSION = 1
COMPLETION_MARKER = ".complete"

# Independent random streams, the second entry of every seed: draws of one stream never depend on how
# much another stream drew, so e.g. adding distractors leaves the identity images unchanged.
_STREAM_IDENTITIES = 0
_STREAM_CAMERA = 1
_STREAM_ASSIGNMENT = 2
_STREAM_IMAGE = 3
_STREAM_DISTRACTOR = 4
_STREAM_JUNK = 5
_STREAM_MISLABEL = 6


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    """Size options of the synthetic dataset; the defaults are the CPU quickstart preset."""

    num_ids: int = 200
    num_cameras: int = 4
    images_per_id: int = 16
    height: int = 128
    width: int = 64
    seed: int = 0
    num_distractors: int | None = None  # None: num_ids // 2 (Market-1501 has ~2,800 for 750 test ids)
    num_junk: int | None = None  # None: num_ids // 4
    # Label noise: the share (%) of training images that show another training identity than their file
    # name says, as when a tracker switches people or an annotator merges two. Test images stay clean.
    mislabeled_percent: int = 0

    def __post_init__(self) -> None:
        # frozen dataclass: the size-dependent defaults are resolved once, here
        if self.num_distractors is None:
            object.__setattr__(self, "num_distractors", self.num_ids // 2)
        if self.num_junk is None:
            object.__setattr__(self, "num_junk", self.num_ids // 4)
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"synthetic option {option.name} must be an int, got {value!r}")
        # Market names have one camera digit and four pid digits; a test identity needs 2 cameras.
        checks = (
            (self.num_ids >= 2, "num_ids must be >= 2 (half train, half test)"),
            (2 <= self.num_cameras <= 9, "num_cameras must be in 2..9 (one digit in Market names)"),
            (self.images_per_id >= 4, "images_per_id must be >= 4 (2 cameras with 2 images each)"),
            (self.height >= 32 and self.width >= 16, "height x width must be at least 32 x 16"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.num_distractors >= 0 and self.num_junk >= 0, "num_distractors and num_junk must be >= 0"),
            (self.num_ids <= 9999, "num_ids must be <= 9999 (four-digit pids)"),
            (0 <= self.mislabeled_percent < 100, "mislabeled_percent must be in 0..99"),
            (
                self.mislabeled_percent == 0 or self.num_ids >= 4,
                "label noise needs 2 training ids: num_ids >= 4",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    @property
    def folder_name(self) -> str:
        # clean data keeps the name it had before label noise existed, so its folders are reused
        noise = f"-m{self.mislabeled_percent}" if self.mislabeled_percent else ""
        return (
            f"synthetic-v{GENERATOR_VERSION}-i{self.num_ids}-c{self.num_cameras}-n{self.images_per_id}"
            f"-{self.height}x{self.width}-d{self.num_distractors}-j{self.num_junk}-s{self.seed}{noise}"
        )

    @property
    def num_train_ids(self) -> int:
        return self.num_ids // 2

    def as_kwargs(self) -> dict[str, int]:
        return dataclasses.asdict(self)  # type: ignore[return-value]  # the None defaults are resolved


# Presets name only the options they change: the others keep their defaults, and the size-dependent ones
# (distractors, junk) follow num_ids when an override changes it.
PRESETS: dict[str, dict[str, int]] = {
    "quickstart": {},  # 200 ids, 4 cameras, 16 images each, 128 x 64: 3,350 images
    "tiny": {"num_ids": 12, "num_cameras": 3, "images_per_id": 6, "height": 64, "width": 32},  # ~80 images
}


def resolve_synthetic_options(preset: str = "quickstart", **overrides: int) -> SyntheticOptions:
    """The options of ``preset`` with ``overrides`` (any :class:`SyntheticOptions` field) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; known presets: {', '.join(PRESETS)}")
    allowed = [option.name for option in dataclasses.fields(SyntheticOptions)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown synthetic option(s) {', '.join(unknown)}; allowed: preset, {', '.join(allowed)}"
        )
    return SyntheticOptions(**{**PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------------------
# Attribute vocabularies. Weights are skewed like real clothing (dark trousers, black/white/grey tops), so
# that many identities share the common values.

_CLOTH_COLOURS = np.float32(1 / 255) * np.array(
    [
        (25, 25, 28),  # black
        (232, 232, 226),  # white
        (128, 128, 132),  # grey
        (32, 42, 92),  # navy
        (62, 112, 190),  # blue / denim
        (182, 32, 38),  # red
        (42, 122, 62),  # green
        (226, 200, 52),  # yellow
        (176, 150, 104),  # khaki
        (102, 66, 40),  # brown
        (226, 142, 172),  # pink
        (112, 62, 142),  # purple
    ],
    dtype=np.float32,
)
_UPPER_WEIGHTS = np.array([16, 14, 12, 10, 10, 8, 6, 5, 4, 4, 6, 5], dtype=np.float64)
_LOWER_WEIGHTS = np.array([30, 4, 12, 20, 15, 2, 2, 1, 9, 5, 1, 1], dtype=np.float64)
_HAIR_COLOURS = np.array([(20, 18, 18), (58, 40, 26), (112, 76, 44), (204, 172, 112), (152, 152, 152)]) / 255
_HAIR_WEIGHTS = np.array([40, 25, 15, 12, 8], dtype=np.float64)
_SKIN_TONES = np.array([(242, 204, 172), (222, 178, 142), (192, 142, 102), (142, 98, 66), (96, 66, 46)]) / 255
_SHOE_COLOURS = np.array([(20, 20, 20), (225, 225, 225), (92, 60, 36)]) / 255

SOLID, HORIZONTAL_STRIPES, VERTICAL_STRIPES, CHECKS = range(4)
_UPPER_PATTERN_WEIGHTS = np.array([55, 20, 10, 15], dtype=np.float64)
_LOWER_PATTERN_WEIGHTS = np.array([80, 4, 8, 8], dtype=np.float64)
TROUSERS, SHORTS, SKIRT = range(3)
NO_BAG, BACKPACK, HANDBAG = range(3)
FRONT, BACK, SIDE = range(3)


def _pick(rng: np.random.Generator, weights: np.ndarray) -> int:
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def _identity_colour(rng: np.random.Generator, palette_colour: np.ndarray) -> np.ndarray:
    # A small per-identity shade: two "red" identities are not pixel-identical, but a camera's colour
    # cast changes a colour more than this, so the model cannot rely on exact shades.
    return np.clip(palette_colour + rng.normal(0.0, 0.025, 3), 0.0, 1.0).astype(np.float32)


def _draw_attribute_group(group: str, rng: np.random.Generator) -> dict[str, object]:
    """The attributes of one group; identities are dicts merging all groups of _ATTRIBUTE_GROUPS."""
    if group == "upper":
        main = _pick(rng, _UPPER_WEIGHTS)
        second = (main + rng.integers(1, len(_CLOTH_COLOURS))) % len(_CLOTH_COLOURS)
        return {
            "upper_rgb": _identity_colour(rng, _CLOTH_COLOURS[main]),
            "upper_rgb2": _identity_colour(rng, _CLOTH_COLOURS[second]),
            "upper_pattern": _pick(rng, _UPPER_PATTERN_WEIGHTS),
            "upper_period": float(rng.uniform(0.025, 0.05)),
            "long_sleeves": bool(rng.random() < 0.6),
        }
    if group == "lower":
        main = _pick(rng, _LOWER_WEIGHTS)
        second = (main + rng.integers(1, len(_CLOTH_COLOURS))) % len(_CLOTH_COLOURS)
        return {
            "lower_rgb": _identity_colour(rng, _CLOTH_COLOURS[main]),
            "lower_rgb2": _identity_colour(rng, _CLOTH_COLOURS[second]),
            "lower_pattern": _pick(rng, _LOWER_PATTERN_WEIGHTS),
            "lower_period": float(rng.uniform(0.03, 0.06)),
            "lower_type": _pick(rng, np.array([70.0, 18.0, 12.0])),
        }
    if group == "bag":
        return {
            "bag": _pick(rng, np.array([50.0, 30.0, 20.0])),
            "bag_rgb": _identity_colour(rng, _CLOTH_COLOURS[rng.integers(len(_CLOTH_COLOURS))]),
            "bag_side": float(rng.choice([-1.0, 1.0])),
        }
    if group == "hair":
        return {
            "hair_rgb": _identity_colour(rng, _HAIR_COLOURS[_pick(rng, _HAIR_WEIGHTS)]),
            "long_hair": bool(rng.random() < 0.35),
        }
    if group == "skin":
        return {"skin_rgb": _identity_colour(rng, _SKIN_TONES[rng.integers(len(_SKIN_TONES))])}
    if group == "shoes":
        return {"shoe_rgb": _identity_colour(rng, _SHOE_COLOURS[rng.integers(len(_SHOE_COLOURS))])}
    if group == "body":
        return {
            "body_height": float(rng.uniform(0.80, 0.94)),  # of the image height, before camera scale
            "body_width": float(rng.uniform(0.85, 1.2)),
            "leg_ratio": float(rng.uniform(0.44, 0.52)),  # share of the body height below the hip
        }
    raise AssertionError(group)


_ATTRIBUTE_GROUPS = ("upper", "lower", "bag", "hair", "skin", "shoes", "body")


def _draw_identity(rng: np.random.Generator) -> dict[str, object]:
    identity: dict[str, object] = {}
    for group in _ATTRIBUTE_GROUPS:
        identity.update(_draw_attribute_group(group, rng))
    return identity


def draw_identities(num_ids: int, seed: int) -> list[dict[str, object]]:
    """Attributes of pids 1..num_ids (list index = pid − 1).

    Half of the identities are a copy of an earlier one with one or two attribute groups redrawn: such
    pairs are the hard negatives that make the synthetic task more than a colour lookup.
    """
    rng = np.random.default_rng([seed, _STREAM_IDENTITIES])
    identities: list[dict[str, object]] = []
    for _ in range(num_ids):
        if identities and rng.random() < 0.5:
            identity = dict(identities[rng.integers(len(identities))])
            for group in rng.choice(_ATTRIBUTE_GROUPS, size=rng.integers(1, 3), replace=False):
                identity.update(_draw_attribute_group(str(group), rng))
        else:
            identity = _draw_identity(rng)
        identities.append(identity)
    return identities


@dataclasses.dataclass(frozen=True)
class _Camera:
    """The look of one camera: colour, optics, framing, typical viewpoints and background."""

    gain: np.ndarray  # per-channel colour cast
    brightness: float
    contrast: float
    noise_std: float
    downscale: float  # > 1: a low-resolution camera (downsampled, then upsampled back)
    blur_radius: float  # in pixels at height 128
    jpeg_quality: int
    person_scale: float
    x_offset: float  # of the person centre, as a share of the width
    shear: float
    view_probabilities: np.ndarray  # FRONT, BACK, SIDE
    background_rgb: np.ndarray
    background_rgb2: np.ndarray
    background_kind: int
    background_period: float
    horizon: float  # share of the height where wall meets floor


def _camera(seed: int, camera: int) -> _Camera:
    rng = np.random.default_rng([seed, _STREAM_CAMERA, camera])
    background = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    return _Camera(
        gain=np.clip(1.0 + rng.normal(0.0, 0.08, 3), 0.8, 1.2).astype(np.float32),
        brightness=float(rng.uniform(-0.08, 0.08)),
        contrast=float(rng.uniform(0.75, 1.15)),
        noise_std=float(rng.uniform(0.005, 0.03)),
        downscale=float(rng.choice([1.0, rng.uniform(1.3, 2.2)])),
        blur_radius=float(rng.uniform(0.0, 0.9)),
        jpeg_quality=int(rng.integers(70, 96)),
        person_scale=float(rng.uniform(0.84, 1.0)),
        x_offset=float(rng.uniform(-0.06, 0.06)),
        shear=float(rng.uniform(-0.12, 0.12)),
        view_probabilities=0.1 + 0.7 * rng.dirichlet([1.0, 1.0, 1.0]),
        background_rgb=background,
        background_rgb2=np.clip(background * rng.uniform(0.6, 1.3, 3), 0.0, 1.0).astype(np.float32),
        background_kind=int(rng.integers(4)),
        background_period=float(rng.uniform(0.1, 0.35)),
        horizon=float(rng.uniform(0.45, 0.75)),
    )


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as float32 (height, width) arrays, shared read-only."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    y.flags.writeable = x.flags.writeable = False
    return y, x


class _Canvas:
    """What is drawn, as a label map plus one colour per label; label 0 is the background texture.

    Painting a label into a uint8 map is ~20x cheaper than painting RGB floats into the image, and the
    colours are looked up once, at the end.
    """

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.zeros((height, width), dtype=np.uint8)
        self.colours: list[np.ndarray] = [np.zeros(3, dtype=np.float32)]  # placeholder for the background

    def label(self, colour: np.ndarray) -> int:
        self.colours.append(np.asarray(colour, dtype=np.float32))
        return len(self.colours) - 1

    def cloth(
        self, base: np.ndarray, second: np.ndarray, pattern: int, period: float, u: np.ndarray, v: np.ndarray
    ) -> int | np.ndarray:
        """Label(s) of a cloth: one label, or a per-pixel choice of two for stripes and checks.

        The pattern is laid out in body coordinates, so stripes follow the body through scale and shear.
        """
        base_label = self.label(base)
        if pattern == SOLID:
            return base_label
        horizontal = (v // period).astype(np.int32) % 2 == 1
        vertical = (u // period).astype(np.int32) % 2 == 1
        stripes = {HORIZONTAL_STRIPES: horizontal, VERTICAL_STRIPES: vertical, CHECKS: horizontal ^ vertical}
        return np.where(stripes[pattern], np.uint8(self.label(second)), np.uint8(base_label))

    def paint(self, mask: np.ndarray, label: int | np.ndarray) -> None:
        """Give the pixels of ``mask`` ``label`` (an int, or a per-pixel label map from :meth:`cloth`)."""
        np.putmask(self.labels, mask, label)

    def paint_colour(self, mask: np.ndarray, colour: np.ndarray) -> None:
        self.paint(mask, self.label(colour))

    def render(self, background: np.ndarray) -> np.ndarray:
        """The (height, width, 3) float image: one lookup in [background pixels; part colours]."""
        height, width = self.labels.shape
        palette = np.concatenate([background.reshape(-1, 3), np.stack(self.colours[1:] or self.colours)])
        pixel_index = np.arange(height * width, dtype=np.int32).reshape(height, width)
        index = np.where(self.labels == 0, pixel_index, height * width - 1 + self.labels.astype(np.int32))
        return np.take(palette, index, axis=0)


def _background(canvas: _Canvas, camera: _Camera, rng: np.random.Generator) -> np.ndarray:
    """The camera's scene (returned as an RGB texture) with clutter boxes (painted on ``canvas``)."""
    height, width = canvas.labels.shape
    y, x = _pixel_grid(height, width)
    ny, nx = y / height, x / height  # both in units of the image height
    shift = rng.uniform(0.0, 1.0)  # the scene moves a little between frames
    shade = None
    if camera.background_kind == 0:  # wall above, floor with darker tile joints below
        blend = (ny > camera.horizon).astype(np.float32)
        shade = 1.0 - 0.2 * (blend * ((ny * 12 + shift) % 1 < 0.08))
    elif camera.background_kind == 1:  # shop windows / panels
        blend = ((nx / camera.background_period + shift) % 1 < 0.5).astype(np.float32)
    elif camera.background_kind == 2:  # vertical lighting gradient
        blend = np.clip(ny + 0.2 * (shift - 0.5), 0.0, 1.0)
    else:  # large soft blotches (foliage, posters)
        phases = rng.uniform(0.0, 2 * np.pi, 2)
        blend = 0.5 + 0.25 * (np.sin(nx * 9 + phases[0]) + np.sin(ny * 7 + phases[1]))
    base, second = camera.background_rgb, camera.background_rgb2
    texture = base + blend[..., None] * (second - base)
    if shade is not None:
        texture *= shade[..., None]
    for _ in range(rng.integers(0, 3)):  # clutter: signs, bins, parked bikes
        top, left = rng.uniform(0.0, 0.9) * height, rng.uniform(-0.2, 0.9) * width
        bottom, right = top + rng.uniform(0.1, 0.4) * height, left + rng.uniform(0.15, 0.5) * width
        canvas.paint_colour((y >= top) & (y < bottom) & (x >= left) & (x < right), rng.uniform(0.1, 0.9, 3))
    return texture.astype(np.float32)


def _draw_person(
    canvas: _Canvas,
    identity: dict[str, object],
    camera: _Camera,
    rng: np.random.Generator,
    *,
    scale: float = 1.0,
    vertical_shift: float = 0.0,
) -> tuple[float, float]:
    """Draw ``identity`` on ``canvas`` as seen by ``camera``; returns the body's (top, bottom) rows.

    Parts are defined in body coordinates: v = 0 at the top of the head and 1 at the soles, u horizontal,
    both in units of the body height, u > 0 towards the person's right side (or facing side in side view).
    """
    height, width = canvas.labels.shape
    y, x = _pixel_grid(height, width)
    body_height = height * float(identity["body_height"]) * camera.person_scale * scale
    body_height *= rng.uniform(0.96, 1.04)  # pose: stooping, stepping
    bottom = height * (rng.uniform(0.95, 0.99) + vertical_shift)
    top = bottom - body_height
    centre = width * (0.5 + camera.x_offset + rng.normal(0.0, 0.03))
    shear = camera.shear + rng.normal(0.0, 0.03)
    view = int(rng.choice(3, p=camera.view_probabilities))
    mirrored = rng.random() < 0.5
    u = (x - centre - shear * (y - bottom)) / body_height
    if mirrored:
        u = -u
    v = (y - top) / body_height

    lighting = rng.uniform(0.9, 1.1)  # per-image light on the person (sun, shadow)

    def label(key: str) -> int:
        return canvas.label(np.clip(np.asarray(identity[key]) * lighting, 0.0, 1.0))

    skin, hair, bag_colour, shoes = label("skin_rgb"), label("hair_rgb"), label("bag_rgb"), label("shoe_rgb")
    upper_cloth, lower_cloth = (
        canvas.cloth(
            np.clip(np.asarray(identity[f"{part}_rgb"]) * lighting, 0.0, 1.0),
            np.clip(np.asarray(identity[f"{part}_rgb2"]) * lighting, 0.0, 1.0),
            int(identity[f"{part}_pattern"]),
            float(identity[f"{part}_period"]),
            u,
            v,
        )
        for part in ("upper", "lower")
    )

    side_view = view == SIDE
    half_torso = 0.125 * float(identity["body_width"]) * (0.62 if side_view else 1.0)
    hip = 1.0 - float(identity["leg_ratio"])
    shoulder = 0.145
    bag, bag_side = identity["bag"], float(identity["bag_side"]) * (-1.0 if view == BACK else 1.0)

    def box(u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
        return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)

    # Behind the body: a backpack seen from the side, long hair seen from the front.
    if bag == BACKPACK and side_view:
        canvas.paint(box(-half_torso - 0.07, -half_torso + 0.02, 0.17, 0.44), bag_colour)
    if identity["long_hair"] and view == FRONT:
        canvas.paint(box(-0.06, 0.06, 0.04, 0.21), hair)

    # Legs: apart in front/back view, striding (opposite slants) in side view.
    leg_half_width = 0.048 * float(identity["body_width"])
    gap = rng.uniform(0.0, 0.02)
    stride = rng.uniform(0.0, 0.1) if side_view else 0.0
    along_leg = np.clip((v - hip) / (1.0 - hip), 0.0, 1.0)
    lower_type = identity["lower_type"]
    cloth_end = {TROUSERS: 0.97, SHORTS: hip + 0.4 * (1 - hip), SKIRT: hip}[lower_type]
    for side in (-1.0, 1.0):
        leg_u = u - side * ((leg_half_width + gap / 2) * (0.3 if side_view else 1.0) + stride * along_leg)
        leg = (np.abs(leg_u) < leg_half_width) & (v >= hip - 0.01)
        canvas.paint(leg & (v < cloth_end), lower_cloth)
        canvas.paint(leg & (v >= cloth_end) & (v < 0.97), skin)
        toe = 0.01 if side_view else 0.0  # feet point forward in side view
        canvas.paint((np.abs(leg_u - toe) < leg_half_width * 1.1) & (v >= 0.97) & (v < 1.0), shoes)
    if lower_type == SKIRT:
        flare = half_torso * (1.0 + 0.4 * np.clip((v - hip) / 0.2, 0.0, 1.0))
        canvas.paint((np.abs(u) < flare) & (v >= hip - 0.02) & (v < hip + 0.45 * (1 - hip)), lower_cloth)

    # Torso: a trapezoid narrowing to the waist, then arms (sleeves in the upper colour, hands in skin).
    waist_taper = 1.0 - 0.12 * np.clip((v - shoulder) / (hip - shoulder), 0.0, 1.0)
    canvas.paint((np.abs(u) < half_torso * waist_taper) & (v >= shoulder) & (v < hip + 0.02), upper_cloth)
    arm_half_width = 0.03 * float(identity["body_width"])
    arm_end = hip + 0.07
    sleeve_end = arm_end - 0.03 if identity["long_sleeves"] else shoulder + 0.1
    # side view: one visible arm, swinging; front/back: one arm at each side of the torso
    arm_offsets = [rng.uniform(-0.15, 0.15) * (v - shoulder)] if side_view else [-1.0, 1.0]
    for offset in arm_offsets:
        arm_u = u - (offset if side_view else offset * (half_torso + arm_half_width * 0.8))
        arm = (np.abs(arm_u) < arm_half_width) & (v >= shoulder + 0.005)
        canvas.paint(arm & (v < sleeve_end), upper_cloth)
        canvas.paint(arm & (v >= sleeve_end) & (v < arm_end), skin)

    # Bags in front of the body.
    if bag == BACKPACK and view == BACK:
        canvas.paint(box(-0.085, 0.085, 0.17, 0.42), bag_colour)
    elif bag == BACKPACK and view == FRONT:
        for strap in (-0.065, 0.065):
            canvas.paint(box(strap - 0.012, strap + 0.012, shoulder, 0.33), bag_colour)
    if bag == HANDBAG:
        handbag_u = 0.02 if side_view else bag_side * (half_torso + 0.05)
        canvas.paint(box(handbag_u - 0.04, handbag_u + 0.04, hip - 0.05, hip + 0.09), bag_colour)

    # Neck, head (a face seen from the front, hair from the back, half and half from the side), hair.
    canvas.paint(box(-0.022, 0.022, 0.11, shoulder + 0.01), skin)
    head = ((u / 0.05) ** 2 + ((v - 0.072) / 0.068) ** 2) < 1.0
    if view == BACK:
        canvas.paint(head, hair)
    else:
        canvas.paint(head, skin)
        canvas.paint(head & ((v < 0.045) | (u < -0.01)) if side_view else head & (v < 0.04), hair)
    if identity["long_hair"] and view != FRONT:
        canvas.paint(box(-0.055 if view == BACK else -0.06, 0.055 if view == BACK else 0.0, 0.06, 0.24), hair)
    return top, bottom


def _occlude(canvas: _Canvas, rng: np.random.Generator, top: float, bottom: float) -> None:
    """An occluder in front of the person: a car or bench at the bottom, or a pole/passer-by at one side."""
    height, width = canvas.labels.shape
    y, x = _pixel_grid(height, width)
    colour = rng.uniform(0.05, 0.95, 3)
    if rng.random() < 0.6:
        canvas.paint_colour(y > bottom - rng.uniform(0.2, 0.45) * (bottom - top), colour)
    else:
        left = rng.uniform(-0.1, 0.8) * width
        canvas.paint_colour((x >= left) & (x < left + rng.uniform(0.2, 0.4) * width), colour)


def _finish(
    canvas: _Canvas, background: np.ndarray, camera: _Camera, rng: np.random.Generator
) -> Image.Image:
    """Render ``canvas`` with the camera's photometry, noise, resolution and blur."""
    height, width = canvas.labels.shape
    image = canvas.render(background)
    gain = camera.gain * camera.contrast
    offset = 0.5 * (1.0 - camera.contrast) + camera.brightness + rng.normal(0.0, 0.03)
    # grey (luma) sensor noise: a third of the cost of per-channel noise, which we would not see anyway
    noise = rng.standard_normal((height, width), dtype=np.float32) * camera.noise_std
    image = image * gain + (offset + noise)[..., None]
    picture = Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    if camera.downscale > 1.0:
        small = (max(1, round(width / camera.downscale)), max(1, round(height / camera.downscale)))
        bilinear = Image.Resampling.BILINEAR
        picture = picture.resize(small, bilinear).resize((width, height), bilinear)
    radius = camera.blur_radius * height / 128
    if radius > 0.15:
        picture = picture.filter(ImageFilter.GaussianBlur(radius))
    return picture


def _identity_image(
    identity: dict[str, object], camera: _Camera, rng: np.random.Generator, height: int, width: int
) -> Image.Image:
    canvas = _Canvas(height, width)
    background = _background(canvas, camera, rng)
    top, bottom = _draw_person(canvas, identity, camera, rng)
    if rng.random() < 0.3:
        _occlude(canvas, rng, top, bottom)
    return _finish(canvas, background, camera, rng)


def _distractor_image(camera: _Camera, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Someone who is no test identity, often badly framed (as Market's pid-0 detections)."""
    canvas = _Canvas(height, width)
    background = _background(canvas, camera, rng)
    badly_framed = rng.random() < 0.5
    _draw_person(
        canvas,
        _draw_identity(rng),
        camera,
        rng,
        scale=rng.uniform(0.6, 1.4) if badly_framed else 1.0,
        vertical_shift=rng.uniform(-0.4, 0.4) if badly_framed else 0.0,
    )
    return _finish(canvas, background, camera, rng)


def _junk_image(camera: _Camera, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Background only, or a fragment of a body far too large for the box (Market's pid −1)."""
    canvas = _Canvas(height, width)
    background = _background(canvas, camera, rng)
    if rng.random() < 0.5:
        _draw_person(canvas, _draw_identity(rng), camera, rng, scale=rng.uniform(2.0, 3.0))
    return _finish(canvas, background, camera, rng)


def _assign_cameras(seed: int, pid: int, num_cameras: int, images_per_id: int) -> list[int]:
    """Camera (1-based) of each image of ``pid``: ≥ 2 cameras with ≥ 2 images each, in shuffled order."""
    rng = np.random.default_rng([seed, _STREAM_ASSIGNMENT, pid])
    num_seen = int(rng.integers(2, min(num_cameras, images_per_id // 2) + 1))
    cameras = rng.choice(np.arange(1, num_cameras + 1), size=num_seen, replace=False)
    assignment = [int(camera) for camera in cameras for _ in range(2)]
    assignment += [int(camera) for camera in rng.choice(cameras, size=images_per_id - len(assignment))]
    return [int(camera) for camera in rng.permutation(assignment)]


def _shown_identity(seed: int, pid: int, index: int, num_train_ids: int, mislabeled_percent: int) -> int:
    """The pid whose person image ``index`` of training identity ``pid`` shows: ``pid`` itself, or (label
    noise) another training identity, drawn uniformly, for ``mislabeled_percent`` % of the images."""
    rng = np.random.default_rng([seed, _STREAM_MISLABEL, pid, index])
    if rng.random() * 100 >= mislabeled_percent:
        return pid
    other = int(rng.integers(1, num_train_ids))  # 1..num_train_ids − 1, then skip pid itself
    return other + (other >= pid)


def _market_name(pid: int, camera: int, index: int) -> str:
    # Junk is named "-1_c..." in Market-1501, not "-001_c...".
    pid_text = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_text}_c{camera}s1_{25 * index + 1:06d}_01.jpg"


def shows_named_identity(path: str | Path, options: SyntheticOptions) -> bool:
    """Whether the training image ``path`` of the dataset ``options`` generated shows the identity its
    name says (``False``: one of its ``mislabeled_percent`` % wrong labels). The generator's own draw,
    recomputed from the name (``_market_name``): the truth needs no file beside the images."""
    pid, _, frame, _ = Path(path).name.split("_")
    return _shown_identity(
        options.seed, int(pid), (int(frame) - 1) // 25, options.num_train_ids, options.mislabeled_percent
    ) == int(pid)


def _save(picture: Image.Image, path: Path, camera: _Camera) -> None:
    picture.save(path, format="JPEG", quality=camera.jpeg_quality)


def _write_dataset(folder: Path, options: SyntheticOptions) -> None:
    """Draw every image of ``options`` into ``folder`` (the three Market-1501 subfolders)."""
    train_dir, query_dir, gallery_dir = (folder / name for name in MARKET_SUBFOLDERS)
    for subfolder in (train_dir, query_dir, gallery_dir):
        subfolder.mkdir()
    seed, height, width = options.seed, options.height, options.width
    cameras = {camera: _camera(seed, camera) for camera in range(1, options.num_cameras + 1)}
    identities = draw_identities(options.num_ids, seed)
    for pid in range(1, options.num_ids + 1):
        is_train = pid <= options.num_train_ids
        queried_cameras: set[int] = set()
        image_cameras = _assign_cameras(seed, pid, options.num_cameras, options.images_per_id)
        for index, camera in enumerate(image_cameras):
            noise = options.mislabeled_percent if is_train else 0
            shown = _shown_identity(seed, pid, index, options.num_train_ids, noise)
            rng = np.random.default_rng([seed, _STREAM_IMAGE, pid, index])
            picture = _identity_image(identities[shown - 1], cameras[camera], rng, height, width)
            if is_train:
                subfolder = train_dir
            elif camera not in queried_cameras:  # the first image of each camera is its query
                queried_cameras.add(camera)
                subfolder = query_dir
            else:
                subfolder = gallery_dir
            _save(picture, subfolder / _market_name(pid, camera, index), cameras[camera])
    for stream, pid, count, draw in (
        (_STREAM_DISTRACTOR, 0, options.num_distractors, _distractor_image),
        (_STREAM_JUNK, -1, options.num_junk, _junk_image),
    ):
        for index in range(count):
            rng = np.random.default_rng([seed, stream, index])
            camera = int(rng.integers(1, options.num_cameras + 1))
            picture = draw(cameras[camera], rng, height, width)
            _save(picture, gallery_dir / _market_name(pid, camera, index), cameras[camera])


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was fully written (its completion marker exists)."""
    return (folder / COMPLETION_MARKER).is_file()


def _remove_leftovers(final: Path) -> None:
    """Delete the temporary and stale folders of ``final`` left by generators that were killed.

    Call it only while holding the lock of ``final``: every other generator of ``final`` then either waits
    for the lock or is dead (the kernel releases a killed process's flock), so none of these folders is in
    use. Folders we may not delete (another user's) stay.
    """
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.stale-*"):
        for leftover in final.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def _publish(temporary: Path, final: Path) -> None:
    """Move the complete folder ``temporary`` to ``final`` unless a complete ``final`` already exists.

    A ``final`` without the marker is a leftover of a crash (or of a copy interrupted by hand): it is
    moved aside and deleted. If another generator wins the race, its folder is kept and ``temporary``
    stays for the caller to delete.
    """
    for _ in range(5):
        if is_complete(final):
            return
        if final.exists():
            stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex}")
            with contextlib.suppress(FileNotFoundError):  # another generator moved it first
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            continue
        try:
            os.rename(temporary, final)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # `final` appeared in between: look again
    raise RuntimeError(f"could not publish the synthetic dataset at {final}: it keeps changing")


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_ids: int = 200,
    num_cameras: int = 4,
    images_per_id: int = 16,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    num_distractors: int | None = None,
    num_junk: int | None = None,
    mislabeled_percent: int = 0,
) -> Path:
    """Write the synthetic dataset to ``out_dir`` (the dataset folder itself) unless it is already complete.

    ``num_ids`` identities (pids 1..num_ids; the first half train, the rest test), ``images_per_id``
    images each over 2..``num_cameras`` cameras, ``height`` × ``width`` JPEGs, plus ``num_distractors``
    (pid 0; default num_ids // 2) and ``num_junk`` (pid −1; default num_ids // 4) gallery images;
    ``mislabeled_percent`` % of the training images show another training identity (label noise).
    Returns ``out_dir``.
    """
    options = SyntheticOptions(
        num_ids=num_ids,
        num_cameras=num_cameras,
        images_per_id=images_per_id,
        height=height,
        width=width,
        seed=seed,
        num_distractors=num_distractors,
        num_junk=num_junk,
        mislabeled_percent=mislabeled_percent,
    )
    out_dir = Path(out_dir).expanduser().absolute()
    if is_complete(out_dir):
        return out_dir
    new_parent = not out_dir.parent.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # without lock support, publishing stays safe (see _publish); only the work may be done twice
    with exclusive_lock(out_dir.with_name(f".{out_dir.name}.lock")) as locked:
        if is_complete(out_dir):  # another generator finished while we waited for the lock
            return out_dir
        if locked:
            _remove_leftovers(out_dir)
        # mkdir, not tempfile.mkdtemp: the folder becomes the dataset folder, so it gets the umask's mode
        # (0755 or 0775, shareable) instead of mkdtemp's 0700; the random suffix keeps the name unique.
        temporary = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex}")
        temporary.mkdir()
        try:
            _write_dataset(temporary, options)
            marker = {"generator_version": GENERATOR_VERSION, **options.as_kwargs()}
            (temporary / COMPLETION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _publish(temporary, out_dir)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)  # still there only if we failed or lost the race
    log.info(_generated_note(out_dir, options, new_parent))
    return out_dir


def _generated_note(folder: Path, options: SyntheticOptions, new_parent: bool) -> str:
    """One line: where the dataset was generated, how big it is, and whether its parent folder is new."""
    images = list(folder.rglob("*.jpg"))
    megabytes = sum(path.stat().st_size for path in images) / 1e6
    note = (
        f"generated the synthetic dataset in {folder}: {len(images):,} images, {options.num_ids} identities "
        f"(+ distractors and junk), {options.num_cameras} cameras, {megabytes:.1f} MB"
    )
    return note + (f"; {folder.parent} did not exist and was created" if new_parent else "")


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI: generate the synthetic dataset under ``--out`` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m reidreg.data.synthetic",
        description="Generate the synthetic multi-camera pedestrian dataset (Market-1501 layout) "
        "into OUT/<folder named after the options>, where build_dataset('synthetic', OUT) finds it.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder that will contain the dataset folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart", help="base options")
    for option in dataclasses.fields(SyntheticOptions):
        flag = f"--{option.name.replace('_', '-')}"
        parser.add_argument(flag, type=int, help=f"override the preset's {option.name}")
    arguments = vars(parser.parse_args(argv))
    out, preset = arguments.pop("out"), arguments.pop("preset")
    try:
        options = resolve_synthetic_options(preset, **{k: v for k, v in arguments.items() if v is not None})
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    folder = generate_synthetic(out / options.folder_name, **options.as_kwargs())
    print(f"synthetic dataset ready at {folder} ({time.perf_counter() - start:.1f} s)")
    return folder


if __name__ == "__main__":
    main()

"""The one conversion of a decoded image, whatever its PIL mode, to the 8-bit RGB every model input is.

PIL's own ``convert("RGB")`` is wrong for two kinds of images a ReID folder can hold: it clips 16-bit
grey (``I;16``, e.g. a 16-bit PNG) to white instead of scaling it, and it drops alpha, showing whatever
colour the transparent pixels happen to store. Every image loader of reidreg (training, the image cache
of ``data.pipeline=gpu``, evaluation, ``reidreg.extract``/``reidreg.export``) goes through
:func:`to_rgb`, and the image check refuses, one line per file, the modes it cannot convert
(:func:`unsupported_mode`).

* ``1``, ``L``, ``RGB``, ``RGBX``, ``YCbCr``, palette ``P`` without transparency: PIL's conversion.
* 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): scaled by the bit depth,
  ``round(v · 255 / 65535)`` (32768 → 128). A 12-bit sensor image stored in 16 bits comes out darker:
  the scaling uses the container's depth, which is what the file declares.
* Alpha (``LA``, ``RGBA``, ``PA``, premultiplied ``RGBa``, and ``P``/``L``/``RGB`` with a
  transparency key): composited over :data:`ALPHA_BACKGROUND`, the ImageNet mean colour — the colour that
  normalises to zero, the same neutral fill as random erasing — so transparent areas carry no signal.
* ``CMYK`` (e.g. a print-workflow JPEG): PIL's conversion ``R = (255 − C)(255 − K)/255`` (per channel),
  without colour management; Adobe's inverted CMYK JPEGs are undone by PIL's decoder.
* Refused: ``I`` (32-bit integers) and ``F`` (32-bit floats) have no declared range to scale from (a
  float image may hold 0–1, 0–255 or radiance; an ``I`` TIFF any integer), and every other mode (``LAB``,
  ``HSV``, ``I;16S``…): converting them would be a guess. Save such images as 8- or 16-bit files.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Background of transparent pixels: the ImageNet mean (0.485, 0.456, 0.406) in 8 bits.
ALPHA_BACKGROUND = (124, 116, 104)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"LA", "RGBA", "PA", "RGBa"})
PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "YCbCr", "CMYK"})
CONVERTIBLE_MODES = PLAIN_MODES | ALPHA_MODES | SIXTEEN_BIT_MODES
_REFUSED_BECAUSE = {
    "I": "32-bit integer pixels have no declared range to scale to 8 bits",
    "F": "32-bit float pixels have no declared range to scale to 8 bits",
}


def unsupported_mode(image: Image.Image) -> str | None:
    """Why ``image``'s mode cannot become 8-bit RGB (one phrase naming the mode), or None if it can."""
    if image.mode in CONVERTIBLE_MODES:
        return None
    reason = _REFUSED_BECAUSE.get(image.mode, "no defined conversion to 8-bit RGB")
    return f"unsupported pixel mode {image.mode} ({reason}); save it as an 8-bit or 16-bit image"


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as a new 8-bit RGB image (see the module docstring); ``ValueError`` for a mode it refuses."""
    problem = unsupported_mode(image)
    if problem is not None:
        raise ValueError(problem)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32)  # native, little- or big-endian uint16
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_rgb(path: str) -> Image.Image:
    """Open and decode ``path`` as 8-bit RGB (:func:`to_rgb`); any failure is a ``ValueError`` or the
    ``OSError`` PIL raises (the caller names the file)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)

"""Which image files fastdit reads, and how their pixels become 8-bit RGB by their real range.

Pillow's `convert("RGB")` is right for 8-bit modes but not for wider samples: it clips 16-bit values
at 255 (a 16-bit PNG comes out nearly white) and maps 32-bit integer or float samples by value (a float
image in [0, 1] comes out black). `to_rgb` decides per Pillow mode:

* 8-bit modes ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", ...): Pillow's own conversion.
* 16-bit greyscale ("I;16", "I;16B", ...): scaled by 255 / 65535 = 1 / 257, so 65535 -> 255.
  Pillow opens 16-bit colour PNGs as "RGB"/"RGBA" already (keeping the high byte), so they need nothing.
* "I" (32-bit integer) from a PNG or a PGM/PPM: those formats have at most 16 bits per sample (Pillow
  scales PGM samples to 0..65535 and older Pillow opens 16-bit greyscale PNGs as "I"), so the same 1/257.
* "I" from any other format (32-bit integer TIFF) and "F" (32-bit float): refused. Their files declare
  no white level, and float images are often linear light or HDR beyond 1; guessing from each file's own
  values would scale two images of one data set differently. The message names the mode.
* any other mode: refused, naming the mode, rather than converted by a guess.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

# Extensions Pillow can decode, as in torchvision's ImageFolder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

EIGHT_BIT_MODES = ("1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose "I" mode images hold at most 16-bit samples (see the module docstring).
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
UNSCALABLE_MODES = {"I": "32-bit integer", "F": "32-bit float"}


class UnsupportedImageMode(UserError):
    """An image whose Pillow mode has no known range to map onto 8 bits."""


def to_rgb(image):
    """An 8-bit RGB PIL image from `image`, scaled by the range its mode stores (module docstring)."""
    from PIL import Image

    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format in SIXTEEN_BIT_I_FORMATS):
        samples = np.asarray(image).astype(np.float32)  # 16-bit integers are exact in float32
        image = Image.fromarray(np.rint(samples / 257.0).astype(np.uint8), mode="L")
    elif mode not in EIGHT_BIT_MODES:
        kind = UNSCALABLE_MODES.get(mode, "unsupported")
        raise UnsupportedImageMode(
            f"Pillow mode {mode!r} ({kind} samples) has no fixed range to scale to 8 bits; "
            f"save the image as an 8- or 16-bit PNG"
        )
    return image.convert("RGB")

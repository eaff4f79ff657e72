"""Decoding image files the one way everywhere: `reprotune predict`, the server and folder datasets.

- EXIF orientation is applied (a phone photo shot in portrait is upright).
- JPEGs are decoded at a reduced scale (draft mode: 1/2, 1/4 or 1/8, never below twice the target),
  so a 48-megapixel photo costs what a 1-megapixel one does.
- Grayscale, palette, CMYK and 16-bit images become RGB; transparency is composited on a white
  background (`BACKGROUND`), and an animated GIF gives its first frame.
- The shorter side is resized to `size` (bilinear, antialiased), then the centre `size` x `size`
  square is cropped: the aspect ratio is kept, the edges of the longer side are lost.
- Anything that would still decode to more than MAX_PIXELS (a decompression bomb: a PNG of
  100,000 x 100,000 pixels fits in a few kilobytes) is refused before its pixels are decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from reprotune.errors import ReprotuneError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # pixels actually decoded, after JPEG draft scaling
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def load_image(path: Path | str, size: int, data: bytes | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file (or `data`, the bytes of the file named `path` in an archive or a request)
    into uint8 (3, size, size) RGB, per the module's rules; refuse more than `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                image.draft("RGB", (2 * size, 2 * size))  # JPEG only: scaled while decoding
                if image.width * image.height > max_pixels:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height}")
                rgb = to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ReprotuneError(f"{path}: too large to decode (more than {max_pixels:,} pixels)") from None
    except UnidentifiedImageError:
        raise ReprotuneError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ReprotuneError(f"{path}: cannot read image ({getattr(exc, 'strerror', None) or exc})") from None
    return np.asarray(fit(rgb, size)).transpose(2, 0, 1).copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on BACKGROUND."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or image.mode.endswith("a"):
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    return image.convert("RGB")


def fit(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then crop the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))

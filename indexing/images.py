"""The one image check and the one list of image suffixes, for every way an image comes in.

Folder listings, prompt/image pair folders, reference folders and the web UI's uploads all
take the files whose suffix is in :data:`IMAGE_SUFFIXES`; the indexing pipeline and the
upload check both decode through :func:`decode_image`, which accepts only the formats in
:data:`IMAGE_FORMATS` and refuses decompression bombs before decoding. A failure is an
:class:`ImageCheckError` (an :class:`~sce_correct.errors.InputError`) whose ``reason`` is one
of the catalog's reject reasons, so the pipeline records it and the UI shows its message.

PIL is imported inside the functions: this module is cheap to import (the CLI reads
:data:`DEFAULT_MAX_PIXELS` for an option's default).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sce_correct.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: Images with more pixels than this are rejected as decompression bombs before decoding.
DEFAULT_MAX_PIXELS = 64_000_000

#: File suffixes (lower case) that name an image, wherever a folder is listed.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
)
#: PIL decoders tried on an image (those of the suffixes above); JPEG also opens a camera's MPO.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM"})

# The reasons, as the values of indexing.catalog.RejectReason (not imported: no SQLAlchemy here).
MISSING, EMPTY, UNREADABLE = "missing", "empty", "unreadable"
NOT_AN_IMAGE, CORRUPT, TRUNCATED, BOMB = "not_an_image", "corrupt", "truncated", "decompression_bomb"


class ImageCheckError(InputError):
    """A file that is not a usable image; ``reason`` is a catalog reject reason, ``detail`` why."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"{name} is not an image: {detail}" if reason == NOT_AN_IMAGE else f"{name}: {detail}")
        self.reason = reason
        self.detail = detail


def is_image_name(path: str | Path) -> bool:
    """Whether the file name ends in one of :data:`IMAGE_SUFFIXES` (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image_file(path: str | Path, name: str | None = None) -> bytes:
    """The bytes of an image file; a missing, unreadable or empty file is an ImageCheckError."""
    path = Path(path)
    name = name or str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageCheckError(name, MISSING, f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImageCheckError(name, UNREADABLE, "a folder, not an image file") from None
    except OSError as error:  # no permission, an I/O error
        raise ImageCheckError(name, UNREADABLE, f"{type(error).__name__}: {error}") from None
    if not data:
        raise ImageCheckError(name, EMPTY, "file is empty (0 bytes)")
    return data


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode an image of an accepted format and at most ``max_pixels``; else ImageCheckError."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        # Only the accepted formats' decoders are tried (no other PIL plugin sees the data).
        # Over max_pixels is refused below; PIL's own bomb warning (raised as an error when the
        # caller's warning filter says so, as a build's does) and error count as bombs too.
        image = Image.open(io.BytesIO(data), formats=sorted(IMAGE_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageCheckError(name, BOMB, str(error)) from None
    except UnidentifiedImageError:
        raise ImageCheckError(name, NOT_AN_IMAGE, f"not data of an accepted format "
                              f"({', '.join(sorted(IMAGE_FORMATS))})") from None
    except Exception as error:  # a recognised header that is malformed
        raise ImageCheckError(name, CORRUPT, f"{type(error).__name__}: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageCheckError(name, BOMB, f"{width}x{height} = {width * height} pixels exceeds the limit "
                              f"of {max_pixels}")
    try:
        image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError...
        message = f"{type(error).__name__}: {error}"
        raise ImageCheckError(name, TRUNCATED if "truncat" in message.lower() else CORRUPT, message) from None
    return image


def check_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, label: str | None = None) -> Path:
    """Return ``path`` when it is a readable image of at most ``max_pixels``; else ImageCheckError."""
    name = label or Path(path).name
    image = decode_image(read_image_file(path, name), name, max_pixels)
    image.close()
    return Path(path)


__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "IMAGE_FORMATS", "ImageCheckError", "is_image_name",
           "read_image_file", "decode_image", "check_image"]

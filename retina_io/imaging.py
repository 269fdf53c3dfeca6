"""Image bytes in, shard-ready bytes out: sniff the format from the contents, check, and convert what DALI can't decode.

Store mode keeps JPEG and PNG bytes exactly as they are. What DALI cannot decode as is — CMYK/YCCK JPEGs, 16-bit
PNGs, palette/alpha/bilevel PNGs, other formats (TIFF, WebP, BMP, GIF, …), an image whose EXIF orientation is not
upright — is converted to 8-bit RGB, upright: PNG for lossless sources, JPEG at ``quality`` for lossy ones. The
conversion reasons are returned so the shard writer can record them in the sample's json.

``resize`` scales the short side to ``resize`` pixels (aspect kept, never upscaled), decoding JPEGs in the DCT domain
(PIL's ``draft``: libjpeg's scaled IDCT, a proper area downscale) to the smallest scale not below the target, then
finishing with Lanczos.

Checks (``plan_image``): the pixel count from the header against ``max_pixels`` before anything is decoded; the file
structure of PNGs and JPEGs (:mod:`retina_io.imgcheck`) under both checks; under ``check="decode"`` a full decode,
and for JPEGs a test that the entropy-coded data does not end early (libjpeg only warns about that, "premature end of
data segment", and fills the rest of the image with grey).

A JPEG is first decoded by libjpeg-turbo with every warning an error (``simplejpeg``, ``strict=True``): one
decode at 1/8 scale that raises no warning proves that the whole entropy-coded stream was there and well formed,
and the image is accepted. Anything that warns (cut data, but also harmless oddities such as padding before a
marker) is decided by the slower test below, so the fast path accepts nothing the slow one would reject.

This module imports only PIL, simplejpeg and numpy: the packer's worker processes import it and nothing heavier.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, JpegImagePlugin

from retina_io.imgcheck import Structure, jpeg_structure, png_structure

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOSSLESS_FORMATS = frozenset({"png", "tiff", "bmp", "gif", "ppm", "pgm", "pbm", "tga", "qoi", "dds", "ico", "pcx"})
STORABLE_JPEG_MODES = frozenset({"L", "RGB"})
STORABLE_PNG_MODES = frozenset({"L", "RGB"})
EXIF_ORIENTATION = 0x0112

# Decompression-bomb guard of last resort: the packer's own limit (``max_pixels``, read from the header before PIL
# opens the file) acts first; this keeps PIL from ever allocating more anywhere in the process.
Image.MAX_IMAGE_PIXELS = 50_000 * 50_000
# The default pixel limit: 50 MP is above every fundus camera (about 24 MP at most) and below memory trouble (a
# 50 MP RGB image decodes into 150 MB).
DEFAULT_MAX_PIXELS = 50_000_000
# Bytes that no image within the pixel limit needs (16-bit RGBA uncompressed plus 16 MB of metadata): a larger file
# is rejected before it is read into memory.
BYTES_PER_PIXEL_LIMIT = 8
METADATA_SLACK = 16 << 20
# Appended before a JPEG's end marker to test that the decoder never needs more data than the file has (no 0xFF).
_ENTROPY_PAD = bytes((i * 97 + 31) % 255 for i in range(512))


class ImageRejected(Exception):
    """An input that cannot be packed; ``reason`` is the reject reason recorded in ``rejects.parquet``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImagePlan:
    """What the packer will do with one image: store it as is, or convert it (and why)."""

    source_format: str  # from the file contents: "jpeg", "png", "tiff", "webp", …
    width: int
    height: int
    mode: str
    conversions: tuple[str, ...]  # empty: store the bytes as they are
    out_format: str  # "jpeg" or "png"

    @property
    def stored_as_is(self) -> bool:
        return not self.conversions

    @property
    def ext(self) -> str:
        return "jpg" if self.out_format == "jpeg" else "png"


def sniff_format(data: bytes) -> str | None:
    """``"jpeg"``/``"png"`` from the magic bytes, else None (PIL decides)."""
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: 8 magic + 4 length + 4 type + 4 width + 4 height, then bit depth.
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can need."""
    return BYTES_PER_PIXEL_LIMIT * max_pixels + METADATA_SLACK


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Reject an image over the pixel limit (from its header: nothing has been decoded)."""
    if width * height > max_pixels:
        raise ImageRejected(
            "image_too_large",
            f"{width}x{height} = {width * height / 1e6:.1f} MP (from the header) is over --max-pixels "
            f"{max_pixels} ({max_pixels / 1e6:g} MP); not decoded",
        )


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():  # the pixel limit decides, right after this header-only open
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("image_too_large", f"PIL refuses to open it: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageRejected("not_an_image", f"contents are no known image format (first bytes {data[:8]!r})") from exc
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"image header does not parse ({type(exc).__name__}: {exc})") from exc


def plan_image(
    data: bytes, *, resize: int | None = None, check: str = "decode", max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImagePlan:
    """Inspect one image's bytes and decide how it is packed; raise :class:`ImageRejected` for bad input.

    The pixel count is checked against ``max_pixels`` from the header first (nothing is decoded). ``check="header"``
    then walks the file structure (PNG chunks to ``IEND`` with their CRCs, JPEG markers to the end-of-image marker;
    bytes after it are allowed); ``check="decode"`` does that and decodes the whole entropy-coded stream (JPEG at 1/8
    scale in the DCT domain, PNG fully), so truncated or corrupt files are caught at pack time. An image that needs a
    conversion is decoded under either check (the conversion decodes it).
    """
    if check not in ("decode", "header"):
        raise ValueError(f"check must be 'decode' or 'header'; got {check!r}")
    if not data:
        raise ImageRejected("empty_file", "the file has 0 bytes")
    magic = sniff_format(data)
    structure = png_structure(data) if magic == "png" else jpeg_structure(data) if magic == "jpeg" else None
    if structure is not None:
        if structure.width and structure.height:
            check_pixels(structure.width, structure.height, max_pixels)
        if structure.problem:
            raise ImageRejected("corrupt_image", structure.problem)
    im = _open(data)
    fmt = magic or (im.format or "unknown").lower()
    if magic == "jpeg" and fmt != "jpeg":
        fmt = "jpeg"
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageRejected("corrupt_image", f"image has size {width}x{height}")
    check_pixels(width, height, max_pixels)
    mode = im.mode
    conversions: list[str] = []
    if fmt == "jpeg":
        if mode not in STORABLE_JPEG_MODES:
            conversions.append(f"mode={mode}")  # CMYK, YCCK (PIL: CMYK), …
    elif fmt == "png":
        if _png_bit_depth(data) == 16:
            conversions.append("16bit")
        elif mode not in STORABLE_PNG_MODES:
            conversions.append(f"mode={mode}")
    else:
        conversions.append(f"format={fmt}")
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        orientation = 1
    if 2 <= orientation <= 8:
        conversions.append(f"exif_orientation={orientation}")
    if resize is not None and min(width, height) > resize:
        conversions.append(f"resize={resize}")

    if check == "decode" or conversions:  # what is converted is decoded when written: it must decode now
        _decode(data, im, fmt, structure)
    lossless = fmt in LOSSLESS_FORMATS or (fmt == "webp" and bool(im.info.get("lossless")))
    out_format = fmt if not conversions else ("png" if lossless else "jpeg")
    return ImagePlan(fmt, width, height, mode, tuple(conversions), out_format)


def _decode(data: bytes, im: Image.Image, fmt: str, structure: Structure | None) -> None:
    # Full scale where scans are split (progressive) or restart (what ends early may not show at 1/8).
    full = structure is not None and (structure.progressive or structure.restart_interval > 0)
    if fmt == "jpeg" and structure is not None and decodes_without_warning(data, full=full):
        return
    try:
        if fmt == "jpeg" and structure is not None:
            # The header already parsed is decoded as is when it is a plain JPEG (an MPO opens anew as one).
            pixels = _jpeg_pixels(data, full=full, im=im if type(im) is JpegImagePlugin.JpegImageFile else None)
        else:
            im.load()
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"{fmt} does not decode ({type(exc).__name__}: {exc})") from exc
    if fmt == "jpeg" and structure is not None:
        # libjpeg fills what is missing with grey and only warns ("premature end of data segment"; PIL drops the
        # warning). With more data before the end marker, a decoder that needed more decodes other pixels; one that
        # had all it needed decodes the same. At 1/8 scale an end inside the last block's detail coefficients does
        # not show (a few pixels); any earlier end does.
        try:
            same = _jpeg_pixels(data[: structure.eoi] + _ENTROPY_PAD + b"\xff\xd9", full=full) == pixels
        except Exception:
            same = False
        if not same:
            raise ImageRejected(
                "corrupt_image",
                "JPEG data ends before the image does (premature end of data segment: part of the image would be "
                "grey); the end-of-image marker follows cut data",
            )


def decodes_without_warning(data: bytes, *, full: bool = False) -> bool:
    """True when libjpeg-turbo decodes the JPEG ``data`` (at 1/8 scale in the DCT domain unless ``full``) without an
    error or a warning. A warning is how libjpeg reports data that ends early ("premature end of data segment"; it
    then fills the rest with grey), a bad Huffman code, a missing restart marker, or bytes where a marker should be;
    False sends the file to the slower test of :func:`plan_image`, which tells the harmless ones from the damage."""
    scale = {} if full else {"min_height": 1, "min_width": 1}  # the smallest scale libjpeg offers: 1/8
    try:
        simplejpeg.decode_jpeg(data, colorspace="rgb", strict=True, **scale)
    except Exception:  # ValueError for libjpeg's errors and (strict) its warnings; CMYK and such cannot go to RGB
        return False
    return True


def _jpeg_pixels(data: bytes, *, full: bool, im: JpegImagePlugin.JpegImageFile | None = None) -> bytes:
    """A JPEG's decoded pixels (at 1/8 scale in the DCT domain unless ``full``), opened as a plain JPEG (an MPO's
    other pictures are not needed) unless ``im`` is ``data`` opened so and not yet loaded."""
    im = im if im is not None else JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    if not full:
        im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
    im.load()
    return im.tobytes()


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The size with short side ``short_side`` and the aspect ratio kept (rounded)."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.uint32)
        if im.mode == "I" and arr.max(initial=0) <= 255:
            arr = arr << 8  # an 8-bit image promoted to I
        im = Image.fromarray((arr >> 8).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (0, 0, 0))  # fundus surround is black
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def prepare_image(
    data: bytes, plan: ImagePlan, *, resize: int | None = None, quality: int = 95
) -> tuple[bytes, int, int]:
    """The bytes that go into the shard for this image, and their width and height."""
    if plan.stored_as_is:
        return data, plan.width, plan.height
    im = Image.open(io.BytesIO(data))
    orientation = next((int(c.split("=")[1]) for c in plan.conversions if c.startswith("exif_orientation=")), 1)
    rotated = orientation >= 5  # orientations 5-8 swap width and height
    width, height = (plan.height, plan.width) if rotated else (plan.width, plan.height)
    resizing = resize is not None and min(width, height) > resize
    size = target_size(width, height, resize) if resizing else None
    if size is not None and plan.source_format == "jpeg" and im.mode in STORABLE_JPEG_MODES:
        # DCT-domain downscale to the smallest power-of-two scale that is still >= the target.
        im.draft(im.mode, size[::-1] if rotated else size)
    im.load()
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb8(im)
    if size is not None and im.size != size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if plan.out_format == "jpeg":
        im.save(buf, format="JPEG", quality=quality, optimize=False)
    else:
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), im.size[0], im.size[1]

"""Guarded image decoding: the one place where untrusted image bytes are opened.

Every image the pipeline or the server reads goes through `open_guarded`: size, format and pixel-count checks run
on the header before any pixel is decoded, and decoding runs under a time limit, so a decompression bomb or a
malformed file costs milliseconds and yields a reason instead of a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import signal
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionflow.data import shards

if TYPE_CHECKING:
    from visionflow.config import ServeParams, ValidateParams


@dataclass(frozen=True)
class DecodeRules:
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP")
    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 1024 * 1024
    min_width: int = 1
    min_height: int = 1
    max_width: int = 65535
    max_height: int = 65535
    timeout_s: float = 10.0

    @classmethod
    def from_params(cls, validation: ValidateParams, serve: ServeParams | None = None) -> DecodeRules:
        """The pipeline's rules (validation, the drift check) from the validate section; with `serve`, the server's:
        the same formats, and the serve section's limits on pixels, upload size and time. Size bounds are judged by
        validation's expectation suite, so they are recorded there rather than rejected here."""
        if serve is not None:
            return cls(
                allowed_formats=tuple(validation.allowed_formats),
                max_pixels=serve.max_pixels,
                max_bytes=int(serve.max_upload_mb * 1024 * 1024),
                timeout_s=serve.request_timeout_s,
            )
        return cls(
            allowed_formats=tuple(validation.allowed_formats),
            max_pixels=validation.max_pixels,
            max_bytes=int(validation.max_file_mb * 1024 * 1024),
            timeout_s=validation.decode_timeout_s,
        )

    @classmethod
    def accepted(cls) -> DecodeRules:
        """For images validation has already accepted (the training cache, benchmarks): generous limits, since the
        pipeline's own were applied when they were accepted."""
        return cls(max_pixels=200_000_000, max_bytes=1 << 30)


class RejectedImage(Exception):
    """The image cannot be used; `reason` is a short machine-friendly code, the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _DecodeTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    # SIGALRM only works in the main thread; worker processes and the CLI are, server threads are not
    # (the server bounds request time itself).
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def _raise(signum, frame):
        raise _DecodeTimeout()

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class PixelBudget:
    """Decoded pixels a caller may still spend (serving: one request's share, every image of a batch together).
    Spent before an image's pixels are decoded, so an image over what is left costs only its header."""

    def __init__(self, pixels: int):
        self.left = pixels

    def spend(self, pixels: int) -> None:
        if pixels > self.left:
            raise RejectedImage(
                "over_pixel_budget",
                f"{pixels} pixels to decode, {self.left} left of this request's budget (serve.max_request_pixels)",
            )
        self.left -= pixels


def open_checked(data: bytes, rules: DecodeRules) -> Image.Image:
    """The image opened and its header checked against the rules; no pixel decoded yet (Pillow decodes it next,
    or another decoder such as nvJPEG takes the bytes from here)."""
    if len(data) == 0:
        raise RejectedImage("empty_file", "the file has zero bytes")
    if len(data) > rules.max_bytes:
        raise RejectedImage("file_too_large", f"{len(data)} bytes > limit {rules.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: our limit, checked below, decides
            img = _open(data)
    except UnidentifiedImageError:
        raise RejectedImage("not_an_image", "no known image format recognised in the bytes") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for malformed headers
        raise RejectedImage("unreadable_header", f"{type(exc).__name__}: {exc}") from None
    fmt = (img.format or "").upper()
    if fmt not in rules.allowed_formats:
        raise RejectedImage("format_not_allowed", f"{fmt or 'unknown'} not in {list(rules.allowed_formats)}")
    width, height = img.size
    if width * height > rules.max_pixels:
        raise RejectedImage("too_many_pixels", f"{width}x{height} exceeds the {rules.max_pixels}-pixel limit")
    if width < rules.min_width or height < rules.min_height:
        raise RejectedImage("too_small", f"{width}x{height} below {rules.min_width}x{rules.min_height}")
    if width > rules.max_width or height > rules.max_height:
        raise RejectedImage("too_large", f"{width}x{height} above {rules.max_width}x{rules.max_height}")
    return img


def _open(data: bytes) -> Image.Image:
    """Image.open, whose own bomb check refuses anything over twice Image.MAX_IMAGE_PIXELS (left as Pillow sets it:
    the process's other Image.open calls keep their guard). Ours (rules.max_pixels, in open_checked) is the one that
    decides, so an image Pillow refuses has its header read again by its format's plugin, which does not check."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        pass
    Image.init()
    fp = io.BytesIO(data)
    for fmt in Image.ID:  # the order Image.open tries the formats in
        factory, accept = Image.OPEN[fmt]
        if accept is None or accept(data[:16]) is True:
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
                continue
    raise UnidentifiedImageError("no plugin reads the header Pillow's bomb check refused")


# Modes whose pixels Image.reduce averages as to_array reads them (16-bit modes are left at full size).
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"}


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    if img.mode in ("P", "PA", "1"):  # palette indices and bilevel pixels cannot be averaged as they are
        transparent = img.mode == "PA" or "transparency" in img.info
        img = img.convert("L" if img.mode == "1" else "RGBA" if transparent else "RGB")
    return img.reduce(factor) if img.mode in _REDUCIBLE else img


def _loaded(img: Image.Image, rules: DecodeRules, fit: int | None, budget: PixelBudget | None) -> Image.Image:
    """Decode the pixels under the time limit. With `fit` (the model's side), a JPEG is decoded at the smallest
    DCT scale (1/2..1/8) still at least fit x fit, and any image at least twice that is box-reduced right after
    decoding: the conversions, properties and resize that follow then cost the model's size, not the upload's
    (a 40 MP image took 3-4 s on the inference thread, almost none of it in the decoder)."""
    if fit is not None and img.format == "JPEG":
        img.draft(img.mode, (fit, fit))
    if budget is not None:
        budget.spend(img.width * img.height)
    try:
        with _time_limit(rules.timeout_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if fit is not None and (factor := min(img.width, img.height) // fit) >= 2:
                img = _reduced(img, factor)
    except _DecodeTimeout:
        raise RejectedImage("decode_timeout", f"decoding took longer than {rules.timeout_s}s") from None
    except Exception as exc:  # noqa: BLE001 - truncated data, bad CRC, broken palette...
        raise RejectedImage("corrupt_data", f"{type(exc).__name__}: {exc}") from None
    return img


def open_guarded(data: bytes, rules: DecodeRules) -> Image.Image:
    """Decode bytes into a fully loaded Pillow image, or raise RejectedImage with the reason."""
    return _loaded(open_checked(data, rules), rules, fit=None, budget=None)


# EXIF orientation -> the transpose that makes the image upright (Pillow's own table, ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. EXIF is untrusted metadata and Pillow's parser raises
    almost anything on a corrupt block (struct.error, TypeError, SyntaxError...): then the EXIF is ignored and the
    pixels are used as stored. (ImageOps.exif_transpose also re-encodes the EXIF, one more place to raise.)"""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - any failure to read the metadata means: no orientation
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Canonical uint8 pixels: HxW for channels=1, HxWx3 for channels=3, whatever the source mode."""
    img = _upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        arr = (arr.astype(np.float64) * 255.0 / peak).round().clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels are composited on white, which is how a person sees the image.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)  # CMYK, YCbCr, P, 1, RGB<->L go through Pillow's colour conversions
    return np.asarray(img, dtype=np.uint8)


def image_properties(gray: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and sharpness of a grayscale uint8 image (the drift check reads the same numbers)."""
    import cv2

    g = gray.astype(np.float32)
    # cv2.meanStdDev: one C call each (numpy's mean/std/var on a 28x28 image cost ~25 us apiece in Python)
    mean, std = cv2.meanStdDev(g)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(g, cv2.CV_32F))
    return {"brightness": float(mean[0, 0]), "contrast": float(std[0, 0]), "blur": float(lap_std[0, 0]) ** 2}


def visual_properties(img: Image.Image, gray: np.ndarray | None = None) -> dict[str, float]:
    """What the drift check compares, measured on the image as received (its own resolution and colours):
    brightness, contrast and sharpness of its grey version (`gray`, when the caller has it already), width,
    height, and colourfulness (Hasler and Suesstrunk's metric; 0 for grey images)."""
    props = image_properties(to_array(img, channels=1) if gray is None else gray)
    props.update(width=float(img.width), height=float(img.height), colorfulness=0.0)
    if img.mode not in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F", "LA"):
        rgb = to_array(img, channels=3).astype(np.float32)
        rg = rgb[..., 0] - rgb[..., 1]
        yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
        props["colorfulness"] = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    return props


PROPERTY_NAMES = ("brightness", "contrast", "blur", "width", "height", "colorfulness")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed (large files are hashed without being read into memory)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stored_size(path: Path | str) -> int:
    """Bytes of a stored image: a file, or a shard member ("<raw_dir>/shard-<hash>.tar#<class>/<file>")."""
    located = shards.split_locator(path)
    return shards.member_size(*located) if located else Path(path).stat().st_size


def read_limited(path: Path | str, max_bytes: int | None) -> bytes:
    """Read a stored image (a file or a shard member, see stored_size), refusing (before reading) anything over
    the byte limit. The one way every stage reads an image from the dataset."""
    if max_bytes is not None and (size := stored_size(path)) > max_bytes:
        raise RejectedImage("file_too_large", f"{size} bytes > limit {max_bytes}")
    located = shards.split_locator(path)
    return shards.read_member(*located) if located else Path(path).read_bytes()


# --- decoding to the model's input (training cache, promotion batches, serving, drift): no torch here ---------


def _to_model_size(arr: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    if arr.shape[0] != image_size or arr.shape[1] != image_size:
        shrink = arr.shape[0] > image_size or arr.shape[1] > image_size
        import cv2  # opencv-python-headless: in the serving image too

        arr = cv2.resize(arr, (image_size, image_size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return arr.reshape(image_size, image_size, channels)


def decode_for_model(
    data: bytes,
    image_size: int,
    channels: int,
    rules: DecodeRules,
    budget: PixelBudget | None = None,
    *,
    draft: bool = True,
) -> np.ndarray:
    """Bytes to the model's input: (H, W, C) uint8 at image_size. The one resize used by training and serving.
    draft=False decodes every pixel first (the reference the reduced decode is measured and tested against)."""
    img = _loaded(open_checked(data, rules), rules, fit=image_size if draft else None, budget=budget)
    return _to_model_size(to_array(img, channels), image_size, channels)


def decode_with_properties(
    data: bytes, image_size: int, channels: int, rules: DecodeRules, budget: PixelBudget | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """decode_for_model plus the image's visual properties, from one decode (serving and the drift check).
    Width and height are the image's as received; the others are measured on the decoded pixels, which for an
    image at least twice the model's size are a reduced copy (the same for the reference and the live images)."""
    pixels, props, _ = decode_reduced(data, image_size, channels, rules, budget)
    return _to_model_size(pixels, image_size, channels), props


def decode_reduced(
    data: bytes, fit: int, channels: int, rules: DecodeRules, budget: PixelBudget | None = None
) -> tuple[np.ndarray, dict[str, float], tuple[int, int]]:
    """The image's upright pixels, reduced when at least twice `fit` on its shorter side (see _loaded), its
    visual properties (as decode_with_properties), and its upright (width, height) at full size: the frame that
    coordinates on the reduced pixels scale back to (a detector's boxes)."""
    img = open_checked(data, rules)
    width, height = img.size
    img = _loaded(img, rules, fit=fit, budget=budget)
    pixels = to_array(img, channels)
    # a grey model's pixels are the grey version the properties need: converted once, not twice
    props = visual_properties(img, gray=pixels if channels == 1 else None)
    props.update(width=float(width), height=float(height))
    turned = pixels.shape[:2] != (img.height, img.width)  # EXIF orientation swapped the sides
    return pixels, props, (height, width) if turned else (width, height)

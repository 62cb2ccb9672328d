import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import png_header_only
from visionflow.imageio import DecodeRules, RejectedImage, image_properties, open_guarded, to_array

RULES = DecodeRules(max_pixels=10_000_000, timeout_s=5)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reason(data: bytes, rules: DecodeRules = RULES) -> str:
    with pytest.raises(RejectedImage) as err:
        open_guarded(data, rules)
    return err.value.reason


def test_rejections_have_reasons():
    good = encode(Image.new("L", (32, 32), 128), "PNG")
    assert reason(b"") == "empty_file"
    assert reason(np.random.default_rng(0).bytes(4000)) == "not_an_image"
    assert reason(good[: len(good) // 2]) in {"corrupt_data", "unreadable_header"}
    assert reason(png_header_only(50_000, 50_000)) == "too_many_pixels"
    assert reason(encode(Image.new("L", (32, 32)), "GIF")) == "format_not_allowed"
    assert reason(good, DecodeRules(min_width=64, min_height=64)) == "too_small"
    assert reason(good, DecodeRules(max_bytes=10)) == "file_too_large"


def test_truncated_jpeg_is_rejected():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    assert reason(data[:300]) in {"corrupt_data", "unreadable_header"}


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "1", "RGB", "L"])
def test_unusual_modes_convert_to_canonical_uint8(mode):
    rgb = Image.new("RGB", (20, 10), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16))
    elif mode == "CMYK":
        img = rgb.convert("CMYK")
    else:
        img = rgb.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = open_guarded(encode(img, fmt), RULES)
    gray = to_array(decoded, channels=1)
    color = to_array(decoded, channels=3)
    assert gray.dtype == np.uint8 and gray.shape == (10, 20)
    assert color.dtype == np.uint8 and color.shape == (10, 20, 3)
    if mode == "I;16":
        assert abs(int(gray[0, 0]) - round(40000 * 255 / 65535)) <= 1


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    arr = to_array(open_guarded(encode(img, "PNG"), RULES), channels=3)
    assert (arr == 255).all()


def test_properties_track_brightness_and_blur():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    dark = (sharp // 4).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(sharp).resize((8, 8)).resize((64, 64), Image.BILINEAR))
    assert image_properties(dark)["brightness"] < image_properties(sharp)["brightness"]
    assert image_properties(blurred)["blur"] < image_properties(sharp)["blur"]
    assert image_properties(np.full((8, 8), 7, np.uint8))["contrast"] == 0

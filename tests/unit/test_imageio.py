import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import png_header_only
from visionflow.data.imageio import (
    DecodeRules,
    RejectedImage,
    image_properties,
    open_checked,
    open_guarded,
    to_array,
)

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


def test_pillows_own_bomb_guard_is_left_on_and_ours_decides():
    import subprocess
    import sys

    # in a fresh interpreter: importing the module changes nothing of Pillow's for the rest of the process
    code = "import visionflow.data.imageio; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == 1024 * 1024 * 1024 // 4 // 3  # Pillow's default
    limit = Image.MAX_IMAGE_PIXELS
    header = png_header_only(15_000, 15_000)  # 225 MP: over twice Pillow's limit, where Pillow itself refuses
    assert open_checked(header, DecodeRules(max_pixels=300_000_000)).size == (15_000, 15_000)
    assert reason(header, DecodeRules(max_pixels=200_000_000)) == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == limit


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


def test_exif_orientation_is_applied_and_a_corrupt_exif_is_ignored():
    """Every reader (validate, drift, training, serving) goes through to_array: a valid orientation turns the image
    upright; an EXIF block Pillow cannot parse (fuzzed: it raises struct.error, TypeError...) is ignored."""
    from tests.helpers import corrupt_exif_jpegs, exif_jpeg
    from visionflow.data.imageio import decode_for_model, decode_with_properties

    assert to_array(open_guarded(exif_jpeg(), RULES), channels=1).shape == (24, 20)  # 24 wide, turned
    for data in corrupt_exif_jpegs(5, seed=3):
        assert to_array(open_guarded(data, RULES), channels=3).shape[2] == 3
        assert decode_for_model(data, 16, 1, RULES).shape == (16, 16, 1)
        assert decode_with_properties(data, 16, 3, RULES)[1]["width"] == 24


@pytest.mark.parametrize(
    "fmt,mode,decoded",
    [
        ("JPEG", "RGB", (500, 375)),
        ("PNG", "RGB", (4000, 3000)),
        ("PNG", "P", (4000, 3000)),
        ("WEBP", "RGB", (4000, 3000)),
    ],
)
def test_large_images_are_decoded_small_and_counted_against_the_budget(fmt, mode, decoded):
    """A JPEG is decoded at the smallest DCT scale still at least the model's size; every format is then
    reduced before conversion; the budget is charged what was decoded, and refuses what it cannot pay."""
    from visionflow.data.imageio import PixelBudget, decode_with_properties

    img = Image.new("RGB", (4000, 3000), (30, 160, 90)).convert(mode)
    data = encode(img, fmt)
    budget = PixelBudget(10**9)
    pixels, props = decode_with_properties(data, 28, 3, DecodeRules(max_pixels=10**8), budget)
    assert pixels.shape == (28, 28, 3) and (props["width"], props["height"]) == (4000, 3000)
    assert 10**9 - budget.left == decoded[0] * decoded[1]
    assert np.abs(pixels.astype(int) - [30, 160, 90]).max() <= 3  # the colour survives the reduction
    with pytest.raises(RejectedImage) as err:
        decode_with_properties(data, 28, 3, DecodeRules(max_pixels=10**8), PixelBudget(decoded[0] * decoded[1] - 1))
    assert err.value.reason == "over_pixel_budget"

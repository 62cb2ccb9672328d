"""The predict routes' upload parse (serving.multipart) on its own: what it returns for well-formed forms, and a
seeded fuzz over broken ones, which must each end as one HTTP answer (400, 413 or 422), never another error."""

from __future__ import annotations

import random

import pytest
from fastapi import HTTPException

from visionflow.serving.multipart import MAX_FIELD_BYTES, multipart_files

LIMITS = {"max_files": 4, "max_fields": 3, "max_file_bytes": 1000}


def form(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = b"vfb") -> tuple[bytes, bytes]:
    body = b""
    for name, filename, data in parts:
        disp = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disp + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--" + boundary + b"--\r\n", b"multipart/form-data; boundary=" + boundary


def parse(body: bytes, ctype: bytes, **limits) -> list[bytes]:
    return multipart_files(body, ctype, **{**LIMITS, **limits})


def status(body: bytes, ctype: bytes, **limits) -> int:
    try:
        parse(body, ctype, **limits)
    except HTTPException as exc:
        return exc.status_code
    return 200


def test_file_parts_in_order_fields_dropped_names_never_read():
    body, ctype = form([(b"a", b"x.png", b"one"), (b"note", None, b"hi"), (b"b", b"../../etc/passwd", b"two")])
    assert parse(body, ctype) == [b"one", b"two"]
    body, ctype = form([(b"f", b"", b"\r\n--vf not the boundary\r\n")])  # an empty file name is still a file
    assert parse(body, ctype) == [b"\r\n--vf not the boundary\r\n"]


@pytest.mark.parametrize(
    "parts,limits,code,words",
    [
        ([(b"f", b"a", b"x")] * 5, {}, 400, "too many files"),
        ([(b"n", None, b"x")] * 4 + [(b"f", b"a", b"x")], {}, 400, "too many fields"),
        ([(b"f", b"a", b"x" * 1001)], {}, 413, "image over 1000 bytes"),
        ([(b"n", None, b"x" * (MAX_FIELD_BYTES + 1)), (b"f", b"a", b"x")], {}, 400, "form field over"),
        ([(b"n", None, b"x")], {}, 422, "multipart file field"),
        ([(b"", b"a", b"x")], {}, 400, "form-data name"),
    ],
)
def test_each_limit_is_its_own_answer(parts, limits, code, words):
    with pytest.raises(HTTPException) as exc:
        parse(*form(parts), **limits)
    assert exc.value.status_code == code and words in exc.value.detail


@pytest.mark.parametrize(
    "ctype,code",
    [
        (b"application/json", 422),
        (b"multipart/form-data", 400),
        (b"multipart/form-data; boundary=" + b"b" * 257, 400),
        (b"multipart/form-data; boundary=other", 400),
    ],
)
def test_a_wrong_content_type_or_boundary(ctype, code):
    body, _ = form([(b"f", b"a", b"x")])
    assert status(body, ctype) == code


def test_fuzzed_forms_each_get_one_http_answer():
    """Bytes flipped, cut, duplicated and spliced in a valid two-part form: every variant is parsed into files
    or refused with 400/413/422 (the parser's own errors are 400s), and nothing else escapes."""
    rng = random.Random(22)
    body, ctype = form([(b"file", b"a.png", bytes(range(256)) * 2), (b"note", None, b"text")])
    junk = [b"\r\n", b"--", b"--vfb", b"\r\n--vfb\r\n", b'"', b";", b"\x00", b"\n", b"Content-Disposition: ", b"\xff"]
    seen = set()
    for _ in range(600):
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b) + 1)
            op = rng.choice(("flip", "cut", "insert", "dup"))
            if op == "flip" and i < len(b):
                b[i] = rng.randrange(256)
            elif op == "cut":
                del b[i : i + rng.randint(1, 40)]
            elif op == "insert":
                b[i:i] = rng.choice(junk)
            else:
                b[i:i] = b[max(i - 30, 0) : i]
        seen.add(status(bytes(b), ctype))
    assert seen <= {200, 400, 413, 422} and 400 in seen and 200 in seen

"""The file parts of a multipart/form-data upload, parsed with every limit checked as the parser goes.

The parser is the `multipart` package's PushMultipartParser (MIT; it finds boundaries and header lines with
bytes.find). python-multipart's parser, used before, walks part headers a byte at a time in Python: 40 us of a
one-image request against 7 us, about a tenth of the server's work per request on the 28 px default model."""

from __future__ import annotations

from fastapi import HTTPException

NO_FILE = "send the image as a multipart file field (e.g. -F file=@image.png)"
MAX_FIELD_BYTES = 64 * 1024  # a form field that is not a file: nothing we read, so it stays small
# RFC 2046 allows 70 characters; 256, as python-multipart had, leaves clients headroom.
MAX_BOUNDARY = 256
MAX_PART_HEADERS = 8  # per part; RFC 7578 needs at most 3
MAX_HEADER_BYTES = 4096  # one part header line


def multipart_files(
    body: bytes, content_type: bytes, *, max_files: int, max_fields: int, max_file_bytes: int
) -> list[bytes]:
    """The file parts of a multipart/form-data body, in order, with every limit checked as the parser goes (the
    5,000th part is never reached: parsing stops at the first part over a limit). Fields without a file name are
    counted and dropped; file names are never read."""
    from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

    kind, options = parse_options_header(content_type.decode("latin-1"))
    if kind != "multipart/form-data":
        raise HTTPException(422, NO_FILE)
    boundary = options.get("boundary")
    if not boundary:
        raise HTTPException(400, "malformed multipart body: no boundary in the Content-Type")
    if len(boundary) > MAX_BOUNDARY:
        raise HTTPException(400, f"malformed multipart body or boundary: a boundary over {MAX_BOUNDARY} characters")
    limits = {"files": max_files, "fields": max_fields}
    counts = {"files": 0, "fields": 0}
    files: list[bytes] = []
    chunks: list[bytes] = []
    size, is_file = 0, False
    try:
        with PushMultipartParser(
            boundary,
            max_header_size=MAX_HEADER_BYTES,
            max_header_count=MAX_PART_HEADERS,
            max_segment_count=max_files + max_fields,
            strict=True,
        ) as parser:
            for event in parser.parse(body):
                if isinstance(event, MultipartSegment):
                    if (event.disposition or "").lower() != "form-data" or not event.name:
                        raise HTTPException(400, "malformed multipart body: a part without a form-data name")
                    is_file = event.filename is not None
                    key = "files" if is_file else "fields"
                    counts[key] += 1
                    if counts[key] > limits[key]:
                        raise HTTPException(400, f"too many {key} in the form: at most {limits[key]}")
                    chunks, size = [], 0
                elif event is not None:  # a piece of the part's content
                    size += len(event)
                    if is_file and size > max_file_bytes:
                        raise HTTPException(413, f"image over {max_file_bytes} bytes")
                    if not is_file and size > MAX_FIELD_BYTES:
                        raise HTTPException(400, f"a form field over {MAX_FIELD_BYTES} bytes")
                    if is_file:
                        chunks.append(event)
                elif is_file:  # the end of a file part
                    files.append(b"".join(chunks))
    except MultipartError as exc:  # (the base of the parser's errors: boundary, framing, headers, its limits)
        raise HTTPException(400, f"malformed multipart body or boundary: {exc}") from None
    if not files:
        raise HTTPException(422, NO_FILE)
    return files

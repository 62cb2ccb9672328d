"""The file parts of a multipart/form-data upload, parsed with every limit checked as the parser goes."""

from __future__ import annotations

from fastapi import HTTPException

NO_FILE = "send the image as a multipart file field (e.g. -F file=@image.png)"
MAX_FIELD_BYTES = 64 * 1024  # a form field that is not a file: nothing we read, so it stays small


def multipart_files(
    body: bytes, content_type: bytes, *, max_files: int, max_fields: int, max_file_bytes: int
) -> list[bytes]:
    """The file parts of a multipart/form-data body, in order, with every limit checked as the parser goes (the
    5,000th part is never reached: parsing stops at the first part over a limit). Fields without a file name are
    counted and dropped; file names are never read."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise HTTPException(422, NO_FILE)
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "malformed multipart body: no boundary in the Content-Type")
    form = _FormParts(max_files=max_files, max_fields=max_fields, max_file_bytes=max_file_bytes)
    try:
        parser = MultipartParser(boundary, form.callbacks())  # refuses a boundary over 256 characters
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:  # (the base of the parser's errors: boundary, framing, headers)
        raise HTTPException(400, f"malformed multipart body or boundary: {exc}") from None
    if not form.files:
        raise HTTPException(422, NO_FILE)
    return form.files


class _FormParts:
    """The parser's callbacks: they collect the file parts and raise HTTPException at the first limit passed."""

    def __init__(self, *, max_files: int, max_fields: int, max_file_bytes: int):
        self.limits = {"files": max_files, "fields": max_fields}
        self.max_file_bytes = max_file_bytes
        self.files: list[bytes] = []
        self.counts = {"files": 0, "fields": 0}
        self.header_field = self.header_value = self.disposition = b""
        self.chunks: list[bytes] = []
        self.size, self.is_file = 0, False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.disposition, self.chunks, self.size, self.is_file = b"", [], 0, False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition, params = parse_options_header(self.disposition)
        if disposition != b"form-data" or b"name" not in params:
            raise HTTPException(400, "malformed multipart body: a part without a form-data name")
        self.is_file = b"filename" in params
        key = "files" if self.is_file else "fields"
        self.counts[key] += 1
        if self.counts[key] > self.limits[key]:
            raise HTTPException(400, f"too many {key} in the form: at most {self.limits[key]}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.is_file and self.size > self.max_file_bytes:
            raise HTTPException(413, f"image over {self.max_file_bytes} bytes")
        if not self.is_file and self.size > MAX_FIELD_BYTES:
            raise HTTPException(400, f"a form field over {MAX_FIELD_BYTES} bytes")
        if self.is_file:
            self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self.is_file:
            self.files.append(b"".join(self.chunks))

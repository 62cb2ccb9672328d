from __future__ import annotations

import pytest

from visionflow.data import overrides as ov
from visionflow.errors import DataError

SHA = "a" * 64


def test_append_then_read_keeps_the_latest_decision(tmp_path):
    path = tmp_path / "sub" / "label_overrides.csv"
    assert ov.read_overrides(path) == {}
    ov.append_overrides(path, [ov.decision(SHA, "Shirt", "T-shirt/top", "review-page")])
    ov.append_overrides(path, [ov.decision(SHA.upper(), "Coat", "T-shirt/top", "audit-cli", note='a "quoted", note')])
    got = ov.read_overrides(path)
    assert list(got) == [SHA] and got[SHA].label == "Coat" and got[SHA].note == 'a "quoted", note'
    assert path.read_text().splitlines()[0] == ",".join(ov.COLUMNS)
    assert not got[SHA].keeps_label and ov.decision(SHA, "x", "x", "s").keeps_label


@pytest.mark.parametrize(
    "text",
    ["sha256,label\nnot-a-hash,Coat\n", f"sha256,label\n{SHA},\n", "name,label\nx,y\n", "\xff\xfe"],
)
def test_a_malformed_file_is_a_data_error_naming_the_file(tmp_path, text):
    path = tmp_path / "label_overrides.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="label overrides"):
        ov.read_overrides(path)


def test_a_bad_decision_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "label_overrides.csv"
    with pytest.raises(DataError):
        ov.append_overrides(path, [ov.decision("short", "Coat", "Shirt", "x")])
    assert not path.exists()

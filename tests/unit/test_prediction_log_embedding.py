"""The prediction log's embedding: base64 float32 written, read back exactly; older logs' lists read too; anything
else is a ValueError, which the drift check counts as a malformed line."""

import base64

import numpy as np
import pytest

from visionflow.serving.predictions import decode_embedding, encode_embedding


def test_an_embedding_survives_the_log_exactly_and_older_lists_still_read():
    emb = np.random.default_rng(0).normal(size=1280).astype(np.float32)
    np.testing.assert_array_equal(decode_embedding(encode_embedding(emb)), emb)
    np.testing.assert_array_equal(decode_embedding([0.5, -1.25]), np.array([0.5, -1.25], dtype=np.float32))


@pytest.mark.parametrize(
    "value",
    [
        "",  # no floats
        "not base64!",
        "AAA",  # not whole base64
        base64.b64encode(b"\0\0\0").decode(),  # not whole float32s
        None,
        5,
        {"a": 1},
        [],
        [[1.0, 2.0]],
        [1, "a"],
    ],
)
def test_anything_else_is_a_value_error(value):
    with pytest.raises(ValueError):
        decode_embedding(value)

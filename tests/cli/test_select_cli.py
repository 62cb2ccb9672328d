"""`visionflow select`: bad input is one line and exit 2 before any model is loaded (the runs on a real champion
are in test_cli_output.py, which shares its champion project)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from visionflow import cli


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--budget", "-1"], "must be 0 or more"),
        (["--strategy", "smart"], "unknown --strategy 'smart'"),
        ([], "holds no images"),  # an empty pool
        (["--set", "review.budget=-3"], "review.budget"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capfd, args, needle):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "empty").mkdir()
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "select", str(tmp_path / "empty"), *args]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err

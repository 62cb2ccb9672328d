"""Every params field, fed values of the wrong type or out of any sane range, is refused with one clear line.

The cases are generated from the Params model itself, so a field added later is fuzzed (and must be bounded) too.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from visionflow import cli
from visionflow.config import Params, load_params, parse_params
from visionflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for name, f in model.model_fields.items():
        key = (*prefix, f.alias or name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, key)
        else:
            out.append((key, ann))
    return out


def _atoms(ann: object) -> set[object]:
    """The plain types (and literal values) an annotation admits."""
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return {("literal", a) for a in args}
    if origin is typing.Annotated:
        return _atoms(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_atoms(a) for a in args))
    if origin is list:
        return {list}
    return {ann}


def _kind(ann: object) -> str:
    atoms = _atoms(ann)
    if bool in atoms:
        return "bool"
    if float in atoms:
        return "float"
    if int in atoms or any(isinstance(a, tuple) and isinstance(a[1], int) for a in atoms):
        return "int"
    if list in atoms:
        return "list"
    if Path in atoms:
        return "path"
    if str in atoms:
        return "str"
    return "literal"


HUGE = [10**30, -(10**30), 1e308, -1e308, math.inf, -math.inf, math.nan]
BAD = {
    # YAML reads `true` as a bool and `"3"` as a string: neither may turn into a number silently
    "int": [True, False, "3", "1e3", 3.5, [1], {"a": 1}, *HUGE],
    "float": [True, False, "0.5", ".inf", "nan", [0.1], {"a": 1}, *HUGE],
    "bool": ["yes", "true", 1, 0, 1.5, [True]],
    "str": [123, 1.5, True, [], {"a": "b"}],
    "path": [123, True, [], {"a": "b"}],
    "literal": ["no-such-choice", 7, True, [], {}],
    "list": ["PNG", 5, True, {"a": 1}, [{"a": 1}], [True]],
}

CASES = [(".".join(key), value) for key, ann in _leaves(Params) for value in BAD[_kind(ann)]]
# through the CLI: one bad value per field (each field a different one of its kind's list), to keep it seconds
CLI_CASES = [(".".join(key), BAD[_kind(ann)][i % len(BAD[_kind(ann)])]) for i, (key, ann) in enumerate(_leaves(Params))]


def _nested(dotted: str, value: object) -> dict:
    raw: dict = {}
    node = raw
    *sections, last = dotted.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[last] = value
    return raw


def test_the_generator_covers_every_kind():
    kinds = {_kind(ann) for _, ann in _leaves(Params)}
    assert kinds == set(BAD), kinds
    assert len(CASES) > 300


@pytest.mark.parametrize("dotted, value", CASES, ids=[f"{d}={v!r}"[:60] for d, v in CASES])
def test_bad_value_is_one_line_naming_the_key(dotted, value):
    with pytest.raises(ConfigError) as err:
        parse_params(_nested(dotted, value))
    msg = str(err.value)
    assert dotted in msg and "\n" not in msg, msg


def test_cli_answers_each_bad_value_with_exit_2_and_one_line(capsys, tmp_path):
    """The same cases through the real command (`--set`, YAML-encoded, as a user types them)."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    failures = []
    for dotted, value in CLI_CASES:
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rc = cli.main(["--params", str(tmp_path / "params.yaml"), "--set", f"{dotted}={text}", "check-params"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or dotted not in lines[0] or captured.out:
            failures.append((dotted, text, rc, captured.err[-300:]))
    assert not failures, failures[:10]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("base:\n  seed: -1\n", "base.seed"),
        ("serve:\n  max_upload_mb: .inf\n", "serve.max_upload_mb"),
        ("serve:\n  max_upload_mb: 1e308\n", "serve.max_upload_mb"),
        ("validate:\n  decode_timeout_s: .inf\n", "validate.decode_timeout_s"),
        ("train:\n  max_epochs: true\n", "train.max_epochs"),
        ("train:\n  channels: true\n", "train.channels"),
        ("train:\n  lr: .nan\n", "train.lr"),
        ("drift:\n  batch_size: 1e3\n", "drift.batch_size"),
    ],
)
def test_issue_examples_in_the_file(tmp_path, text, needle):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_params(tmp_path / "p.yaml")


def test_every_numeric_field_accepts_its_own_default():
    """Bounds are not so tight that the shipped values fail (the repo's params.yaml loads too)."""
    assert parse_params(Params().as_dict()) == Params()
    load_params(REPO / "params.yaml")

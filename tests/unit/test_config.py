from pathlib import Path

import pytest
import yaml

from visionflow.config import Params, load_params, parse_params
from visionflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_digest_is_stable():
    a = load_params(REPO / "params.yaml")
    b = load_params(REPO / "params.yaml")
    assert a.digest() == b.digest()
    assert a.validation.max_pixels > 0
    assert a.train.augment.hflip == pytest.approx(0.5)


def test_defaults_are_the_values_in_params_yaml():
    """Params() defaults equal the repo's params.yaml field by field, so a key left out of a params file means what
    the shipped file says (and the two cannot drift apart again)."""
    shipped, defaults = load_params(REPO / "params.yaml").as_dict(), Params().as_dict()
    differ = [
        f"{section}.{key}: params.yaml {value!r}, default {defaults[section][key]!r}"
        for section, values in shipped.items()
        for key, value in values.items()
        if defaults[section][key] != value
    ]
    assert differ == []


def test_the_validate_section_has_one_name():
    """`validate` in YAML, `.validation` in code; the attribute's name is not a second YAML key."""
    p = parse_params({"validate": {"min_width": 9}})
    assert p.validation.min_width == 9 and p.as_dict()["validate"]["min_width"] == 9
    with pytest.raises(ConfigError, match="validation: unknown key; allowed keys here: .*validate"):
        parse_params({"validation": {}})
    # an unknown key inside the section is a clear error naming the section's keys (it was a KeyError)
    with pytest.raises(ConfigError, match="validate.max_pixel: unknown key; allowed keys here: .*max_pixels"):
        parse_params({"validate": {"max_pixel": 1}})


def test_unknown_key_names_key_and_allowed(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "p.yaml")
    msg = str(err.value)
    assert "train.max_epoch" in msg and "max_epochs" in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="trian: unknown key.*train"):
        parse_params({"trian": {}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        parse_params({"train": {"batch_size": "big"}})


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"train\.precision.*'bf16-mixed'"):
        parse_params({"train": {"precision": "fp8"}})


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"validate\.max_quarantine_fraction"):
        parse_params({"validate": {"max_quarantine_fraction": 2}})


def test_malformed_yaml_reports_line(tmp_path):
    (tmp_path / "p.yaml").write_text("base:\n  seed: 1\n data: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(tmp_path / "p.yaml")


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_params(["a", "b"])


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"train": {"max_epochs": 2}}))
    p = load_params(tmp_path / "p.yaml", ["train.max_epochs=5", "data.max_images=null"])
    assert p.train.max_epochs == 5 and p.data.max_images is None
    with pytest.raises(ConfigError, match="train.max_epochs"):
        load_params(tmp_path / "p.yaml", ["train.max_epochs=-1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(tmp_path / "p.yaml", ["oops"])


def test_size_bounds_consistent():
    with pytest.raises(ConfigError, match="must not exceed"):
        parse_params({"validate": {"min_width": 100, "max_width": 10}})


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A billion-laughs document inside a known key: each level holds `width` aliases of the one before."""
    lines = ["data:", "  labels:", '    - &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text",
    [
        _alias_bomb(),
        _alias_bomb(levels=3, width=2),
        "base: &b {seed: 1}\ndata: *b\n",
        "x: &v 1\nbase:\n  seed: *v\n",
        "m: &m {seed: 1}\nbase:\n  <<: *m\n",
    ],
)
def test_yaml_aliases_are_refused_before_they_expand(tmp_path, text):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match="alias") as err:
        load_params(tmp_path / "p.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="alias"):
        load_params(REPO / "params.yaml", ["data.labels=[&x a, *x]"])


@pytest.mark.parametrize(
    "blob", ["base:\n  project: caf\xe9\n".encode("latin-1"), b"\xff\xfe\x00b\x00a", b"base:\n  seed: 1\n\x80\x81\n"]
)
def test_non_utf8_params_file(tmp_path, blob):
    (tmp_path / "p.yaml").write_bytes(blob)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_params(tmp_path / "p.yaml")


@pytest.mark.parametrize("text", ["[" * 20000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 3000))])
def test_deeply_nested_yaml_is_a_clear_error(tmp_path, text):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match="p.yaml"):
        load_params(tmp_path / "p.yaml")


def test_oversized_params_file_is_refused_unread(tmp_path):
    (tmp_path / "p.yaml").write_text("base:\n  project: " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="too large"):
        load_params(tmp_path / "p.yaml")


@pytest.mark.parametrize(
    "override",
    ["train.lr=[", "train.lr={", "train.lr='", "train.lr=: :", "train.lr=@x", "train.lr=\t- a\n-", "train.lr=%TAG"],
)
def test_malformed_yaml_in_an_override_is_a_clear_error(override):
    with pytest.raises(ConfigError, match=r"--set train\.lr") as err:
        load_params(REPO / "params.yaml", [override])
    assert "\n" not in str(err.value)


def test_override_on_a_non_mapping_file_is_not_silently_applied(tmp_path):
    (tmp_path / "p.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(tmp_path / "p.yaml", ["train.max_epochs=2"])


@pytest.mark.parametrize("text, value", [("1e-05", 1e-05), ("2E-3", 2e-3), ("1.5e-4", 1.5e-4), ("0.001", 0.001)])
def test_exponent_floats_are_numbers_not_text(text, value):
    """str(1e-05) is how retraining passes drift.warm_start_lr on; YAML 1.1 alone would read it as text."""
    assert load_params(REPO / "params.yaml", [f"train.lr={text}"]).train.lr == value
    with pytest.raises(ConfigError, match=r"drift\.batch_size"):
        load_params(REPO / "params.yaml", ["drift.batch_size=1e3"])  # a float is no batch size

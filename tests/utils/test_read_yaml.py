"""chatrlhf.utils.config.read_yaml: a broken --config file is named with the line and column of the problem."""
import re

import pytest

from chatrlhf.utils.config import read_yaml


@pytest.mark.parametrize("text, line, column", [
    ("learning_rate: 1e-5\ndata_path: [a, b\nzero_stage: 2\n", 3, 11),  # unclosed flow list
    ("learning_rate: 1e-5\n\tzero_stage: 2\n", 2, 1),  # a tab cannot indent
    ("model_name_or_path: 'unterminated\n", 2, 1),
    ("seed: 1\n seed2: 2\n", 2, 7),  # mapping inside a plain scalar
])
def test_broken_yaml_names_the_file_and_line(tmp_path, text, line, column):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^--config {re.escape(str(path))}: line {line}, column {column}: "
                                         r"invalid YAML \(.+\)$"):
        read_yaml(path)


def test_option_name_is_the_callers(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("a: [\n")
    with pytest.raises(ValueError, match=rf"^--recipe {re.escape(str(path))}: line 2"):
        read_yaml(path, option="--recipe")


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"seed: 1\nname: caf\xe9\n")
    with pytest.raises(ValueError, match=rf"^--config {re.escape(str(path))}: not UTF-8"):
        read_yaml(path)


def test_good_yaml_still_reads(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("--seed: 3\ndata_path: [a, b]\n")
    assert read_yaml(path) == {"seed": 3, "data_path": ["a", "b"]}
    path.write_text("")
    assert read_yaml(path) == {}
    path.write_text("- a\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        read_yaml(path)

"""The one JSONL reader (shared/files.read_jsonl): what a user sees for a damaged file."""

import pytest

from shared.files import read_jsonl


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n  \n{"prompt": "b"}\n')
    assert list(read_jsonl(path)) == [(1, {"prompt": "a"}), (4, {"prompt": "b"})]


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"prompts.jsonl line 2 is not JSON"):
        list(read_jsonl(path))


def test_a_torn_line_can_be_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": ')
    skipped = []
    rows = list(read_jsonl(path, lambda number, exc: skipped.append(number)))
    assert rows == [(1, {"n": 1}), (2, {"n": 2})] and skipped == [3]

"""perft_qlora.atomic: the one atomic file writer."""

import os

import pytest

from perft_qlora.atomic import atomic_path, write_json, write_text


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_text(str(path), "first")
    write_json(str(path), {"a": 1}, indent=None)
    assert path.read_text() == '{"a": 1}\n' and os.listdir(path.parent) == ["summary.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(str(path)) as temporary:
        with open(temporary, "w") as handle:
            handle.write("half a rep")
        raise RuntimeError("killed")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["report.md"]


def test_files_get_the_usual_mode_not_a_private_one(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(str(tmp_path / "a.txt"), "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644

"""What a run owns in --output-dir: a user's files are never removed or written over, --overwrite is all or
nothing, killed runs' leftovers are cleaned, --resume skips incomplete checkpoints. Everything here is decided
before any model loads (``load_model`` fails the test)."""

from __future__ import annotations

import json
import os

import pytest

from perft_qlora.errors import UsageError
from perft_qlora.training import train
from perft_qlora.training.model_card import render_model_card
from perft_qlora.training.output_dir import card_is_free, clean_leftovers, remove_all, remove_incomplete
from perft_qlora.training.run_checkpoints import COMPLETE_NAME, incomplete_reason, mark_complete
from perft_qlora.training.train_options import DEMO_PRESETS

OUR_CONFIG = json.dumps({"format_version": 1, "library": "perft_qlora"})


class Loading(Exception):
    """What ``load_model`` raises here: the run got past every check."""


@pytest.fixture
def no_loading(monkeypatch):
    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(train, "load_model", loading)


def _checkpoint(directory, complete: bool = True):
    directory.mkdir(parents=True)
    (directory / "perft_config.json").write_text(OUR_CONFIG)
    (directory / "optimizer.pt").write_bytes(b"state")
    if complete:
        (directory / "trainer_state.json").write_text("{}")
        mark_complete(str(directory))
    return directory


def _contents(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def argv(tiny_checkpoint, tmp_path):
    def make(*extra):
        return ["--model", tiny_checkpoint("olmoe"), "--data", DEMO_PRESETS["data"], "--output-dir",
                str(tmp_path / "out"), *extra]

    return make


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_overwrite_removes_only_our_outputs_and_nothing_when_a_users_folder_is_in_the_way(argv, tmp_path, no_loading,
                                                                                       capsys):
    out = tmp_path / "out"
    _checkpoint(out / "checkpoint-2")
    (out / "adapter").mkdir()
    (out / "adapter" / "perft_config.json").write_text(OUR_CONFIG)
    (out / "checkpoint-notes.txt").write_text("mine")  # not a checkpoint's name: never looked at
    (out / "README.md").write_text("# my notes\n")
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "notes.md").write_text("mine too")  # a checkpoint's name, a user's folder
    before = _contents(out)
    line = _error_line(capsys, argv("--overwrite"))
    assert line == (f"error: {out / 'checkpoint-7'} was not written by a perft_qlora run (it holds notes.md) and this "
                    "run writes there; move it out of --output-dir, or pass another --output-dir (nothing was removed)")
    assert _contents(out) == before
    (out / "checkpoint-7" / "notes.md").rename(tmp_path / "notes.md")
    (out / "checkpoint-7").rmdir()
    with pytest.raises(Loading):
        train.main(argv("--overwrite"))
    err = capsys.readouterr().err
    assert f"--overwrite: removing checkpoint-2/, adapter/ from {out}" in err
    assert f"{out}/README.md is not a model card of ours: it is kept" in err
    assert sorted(os.listdir(out)) == ["README.md", "checkpoint-notes.txt"]  # no lock, no removal directory left
    assert (out / "README.md").read_text() == "# my notes\n" and (out / "checkpoint-notes.txt").read_text() == "mine"


def test_a_users_file_where_the_adapter_goes_is_refused_before_loading(argv, tmp_path, no_loading, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter").write_text("my adapter notes")
    line = _error_line(capsys, argv())
    assert f"{tmp_path / 'out' / 'adapter'} was not written by a perft_qlora run (not a directory)" in line
    assert (tmp_path / "out" / "adapter").read_text() == "my adapter notes"


def test_the_model_card_never_replaces_a_users_readme(tmp_path):
    assert card_is_free(str(tmp_path))
    card = render_model_card({"base_model": "base", "variant": "perft"}, {"variant": "perft"})
    (tmp_path / "README.md").write_text(card)
    assert card_is_free(str(tmp_path))  # our own card, from an earlier run
    (tmp_path / "README.md").write_text("# perft adapter for base\n\nmy notes")
    assert not card_is_free(str(tmp_path))


def test_a_removal_that_fails_part_way_puts_everything_back(tmp_path):
    _checkpoint(tmp_path / "checkpoint-1")
    before = _contents(tmp_path)
    with pytest.raises(UsageError, match="nothing was removed"):
        remove_all(str(tmp_path), [str(tmp_path / "checkpoint-1"), str(tmp_path / "checkpoint-9")])
    assert _contents(tmp_path) == before and os.listdir(tmp_path) == ["checkpoint-1"]


def test_killed_runs_leftovers_are_cleaned_and_a_moved_aside_adapter_put_back(tmp_path):
    (tmp_path / ".adapter-k2j3h4g5").mkdir()  # save_adapter's staging, killed after the weights
    (tmp_path / ".adapter-k2j3h4g5" / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / ".adapter-old-adapter-a1b2c3d4" / "old").mkdir(parents=True)  # killed between its two renames
    (tmp_path / ".adapter-old-adapter-a1b2c3d4" / "old" / "perft_config.json").write_text(OUR_CONFIG)
    (tmp_path / ".perft-removing-x1y2z3w4" / "0-checkpoint-3").mkdir(parents=True)  # killed while removing
    (tmp_path / ".adapter-mine").mkdir()  # a user's hidden folder: not a staging directory of ours
    (tmp_path / ".adapter-mine" / "notes.txt").write_text("mine")
    done = clean_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".adapter-mine", "adapter"], done
    assert (tmp_path / "adapter" / "perft_config.json").read_text() == OUR_CONFIG
    assert len(done) == 3 and "put adapter/ back (a killed save had moved it aside)" in done


def test_only_an_incomplete_checkpoint_of_ours_is_replaced(tmp_path):
    complete, partial = _checkpoint(tmp_path / "checkpoint-1"), _checkpoint(tmp_path / "checkpoint-2", complete=False)
    assert incomplete_reason(str(complete)) is None
    assert incomplete_reason(str(partial)) == f"no {COMPLETE_NAME} (its save did not finish)"
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "draft.txt").write_text("mine")
    assert not remove_incomplete(str(complete)) and not remove_incomplete(str(tmp_path / "checkpoint-3"))
    assert remove_incomplete(str(partial))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3"]


def test_resume_skips_incomplete_checkpoints_and_says_which(argv, tmp_path, no_loading, capsys, monkeypatch):
    monkeypatch.setattr(train, "check_resume_checkpoint", lambda *args: None)  # these checkpoints are stand-ins
    out = tmp_path / "out"
    _checkpoint(out / "checkpoint-1")
    _checkpoint(out / "checkpoint-2", complete=False)
    with pytest.raises(Loading):
        train.main(argv("--resume"))
    err = capsys.readouterr().err
    assert (f"--resume: skipping {out / 'checkpoint-2'}, incomplete (no {COMPLETE_NAME} (its save did not finish)); "
            "training writes it again at its step") in err
    assert f"resuming from {out / 'checkpoint-1'}" in err
    line = _error_line(capsys, argv("--resume", str(out / "checkpoint-2")))
    assert line == (f"error: --resume {out / 'checkpoint-2'}: an incomplete checkpoint (no {COMPLETE_NAME} (its save "
                    f"did not finish)); pass --resume alone to continue from the last complete one "
                    f"({out / 'checkpoint-1'})")
    os.remove(out / "checkpoint-1" / "optimizer.pt")  # listed by its completion record
    line = _error_line(capsys, argv("--resume"))
    assert line == (f"error: --resume: no complete checkpoint in {out} (checkpoint-1/, checkpoint-2/ did not finish "
                    "saving); leave out --resume and pass --overwrite to start over")

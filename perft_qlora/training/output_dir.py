"""What a run owns in ``--output-dir``, and how it removes or replaces it.

A run writes only names it owns: ``checkpoint-N/``, ``adapter/``, ``base/`` (``--demo``), the model card
``README.md``, its lock and its hidden staging directories. Before loading, ``earlier_outputs`` looks at every
one of those names that already exists and decides by its *contents* whether an earlier run of ours wrote it:

- a checkpoint or adapter is ours when it holds only files our runs write (adapter, optimizer, scheduler, RNG
  and trainer state, peft's and the tokenizer's files for ``--variant lora``, the atomic writer's temporaries)
  and says so (``perft_config.json`` of ``perft_qlora``, a peft config, ``trainer_state.json``, the completion
  record), or is empty; ``base/`` is ours when it holds only the shipped demo base's files;
- anything else at one of those names (a file, a folder of the user's) stops the run with one line before any
  model loads, whatever the options: nothing is removed and nothing is written over;
- ``README.md`` is ours when it is a model card we wrote; a user's ``README.md`` is kept, and the card then goes
  only beside the adapter (``adapter/README.md``).

``start_over`` (``--overwrite``, or a later ``--demo``) moves everything it removes into one hidden directory
first, undoing the moves if one fails, then deletes that directory: all or nothing. Staging directories of ours
left by a killed run (``.adapter-*``, ``.perft-removing-*``) are cleaned at the next run (``clean_leftovers``),
and an adapter that a killed save had moved aside is put back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

from ..errors import UsageError
from ..method.adapters import TRAINING_NAME
from ..method.checkpoint import CARD_NAME, CONFIG_NAME, LEGACY_CONFIG_NAME, WEIGHTS_NAME
from .demo_base import MANIFEST, demo_base_dir
from .run_checkpoints import COMPLETE_NAME, STATE_NAME, checkpoint_step, incomplete_reason

ADAPTER_FILES = {CONFIG_NAME, LEGACY_CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}
RUN_FILES = ADAPTER_FILES | {
    TRAINING_NAME, COMPLETE_NAME, STATE_NAME, "optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin",
    # --variant lora: peft's adapter and the tokenizer the Trainer saves beside it
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model",
}
_RNG = re.compile(r"^rng_state(_\d+)?\.pth$")
TRASH_PREFIX = ".perft-removing-"
STAGING_PREFIX = ".adapter-"  # method/checkpoint.py's save_adapter: .adapter-XXXX (new files), .adapter-old-NAME-XXXX
CARD_SIGN = "python -m perft_qlora.generate --model"  # a line of every card model_card.py renders


def _temporary_of(name: str, names: set[str]) -> bool:
    """``.NAME.XXXXXXXX``: the atomic writer's temporary for one of ``names`` (perft_qlora/atomic.py)."""
    return name.startswith(".") and name[1:].rsplit(".", 1)[0] in names


def _our_name(name: str, names: set[str]) -> bool:
    return name in names or bool(_RNG.match(name)) or _temporary_of(name, names)


def _says_ours(directory: str, names: list[str]) -> bool:
    if {COMPLETE_NAME, STATE_NAME, TRAINING_NAME} & set(names):
        return True
    for config in (CONFIG_NAME, LEGACY_CONFIG_NAME):
        if config in names:
            try:
                with open(os.path.join(directory, config), encoding="utf-8") as handle:
                    value = json.load(handle)
            except (OSError, ValueError):
                continue
            if isinstance(value, dict) and (value.get("library") == "perft_qlora" or "peft_type" in value):
                return True
    return False


def not_ours(path: str, demo_base: bool = False) -> str | None:
    """Why ``path`` (a checkpoint, ``adapter/`` or, ``demo_base``, ``base/``) was not written by a run of ours, or
    None when it was (by its contents, see the module doc)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return "not a directory"
    names = sorted(os.listdir(path))
    allowed = set(os.listdir(demo_base_dir())) - {MANIFEST} if demo_base else RUN_FILES
    others = [name for name in names if not _our_name(name, allowed) or not os.path.isfile(os.path.join(path, name))]
    if others:
        return f"it holds {', '.join(others[:3])}" + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    if names and not demo_base and not _says_ours(path, names):
        return "none of its files says perft_qlora wrote it"
    return None


def earlier_outputs(output_dir: str, demo_base: bool) -> list[str]:
    """What an earlier run of ours wrote at the names this run writes (checkpoints, ``adapter/``, with
    ``demo_base`` ``base/``); UsageError, before anything is touched, when one of them holds something else."""
    if not os.path.isdir(output_dir):
        return []
    found = [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir), key=lambda n: (
        checkpoint_step(n) is None, checkpoint_step(n) or 0, n)) if checkpoint_step(name) is not None]
    found += [os.path.join(output_dir, name) for name in ("adapter", "base") if name == "adapter" or demo_base]
    ours = []
    for path in found:
        if not os.path.lexists(path):
            continue
        why = not_ours(path, demo_base=os.path.basename(path) == "base")
        if why is not None:
            raise UsageError(f"{path} was not written by a perft_qlora run ({why}) and this run writes there; move "
                             "it out of --output-dir, or pass another --output-dir (nothing was removed)")
        ours.append(path)
    return ours


def names(paths: list[str]) -> str:
    listed = [os.path.basename(p) + "/" for p in paths]
    return ", ".join(listed[:4]) + (f" and {len(listed) - 4} more" if len(listed) > 4 else "")


def remove_all(output_dir: str, paths: list[str]) -> None:
    """Remove ``paths`` (inside ``output_dir``) all or nothing: each is renamed into one hidden directory first
    (undone if a rename fails), then that directory is deleted; a run killed while deleting leaves it to
    :func:`clean_leftovers`."""
    trash = tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=output_dir)
    moved: list[tuple[str, str]] = []
    try:
        for index, path in enumerate(paths):
            target = os.path.join(trash, f"{index}-{os.path.basename(path)}")
            os.rename(path, target)
            moved.append((path, target))
    except OSError as err:
        for path, target in reversed(moved):
            os.rename(target, path)
        os.rmdir(trash)
        raise UsageError(f"cannot remove {path} ({err.strerror or err}); nothing was removed") from err
    shutil.rmtree(trash)


def clean_leftovers(output_dir: str) -> list[str]:
    """Remove what killed runs of ours left in ``output_dir``: staging directories of ``save_adapter`` holding only
    adapter files (an adapter a killed save had moved aside is put back where it was missing), the atomic
    writer's card temporaries, and :func:`remove_all`'s directories. Returns a line per thing done."""
    done = []
    if not os.path.isdir(output_dir):
        return done
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(TRASH_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path)
            done.append(f"removed {name} (a removal a killed run did not finish)")
        elif name.startswith(STAGING_PREFIX + "old-") and os.path.isdir(path) and os.listdir(path) == ["old"]:
            target = os.path.join(output_dir, name[len(STAGING_PREFIX + "old-"):].rsplit("-", 1)[0])
            if not os.path.lexists(target) and not_ours(os.path.join(path, "old")) is None:
                os.rename(os.path.join(path, "old"), target)
                done.append(f"put {os.path.basename(target)}/ back (a killed save had moved it aside)")
            shutil.rmtree(path, ignore_errors=True)
        elif (name.startswith(STAGING_PREFIX) and os.path.isdir(path)
              and all(_our_name(n, ADAPTER_FILES) for n in os.listdir(path))):
            shutil.rmtree(path)
            done.append(f"removed {name} (a save a killed run did not finish)")
        elif _temporary_of(name, {CARD_NAME}) and os.path.isfile(path):
            os.remove(path)
    return done


def remove_incomplete(checkpoint: str) -> bool:
    """Remove ``checkpoint`` when it is an incomplete checkpoint of ours (a killed save), so that a run reaching its
    step writes it again; True if removed."""
    if os.path.isdir(checkpoint) and incomplete_reason(checkpoint) is not None and not_ours(checkpoint) is None:
        remove_all(os.path.dirname(checkpoint), [checkpoint])
        return True
    return False


def is_our_card(path: str) -> bool:
    """Whether ``path`` is a model card a run of ours wrote (model_card.py's text), so a new card may replace it."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith("# ") and CARD_SIGN in text


def card_is_free(output_dir: str) -> bool:
    """Whether the model card may be written as ``<output_dir>/README.md``: nothing there, or our own card."""
    path = os.path.join(output_dir, CARD_NAME)
    return not os.path.lexists(path) or (os.path.isfile(path) and is_our_card(path))


def start_over(output_dir: str, earlier: list[str], why: str) -> None:
    """Remove an earlier run's ``earlier`` outputs (all ours: ``earlier_outputs``), all or nothing, saying so."""
    print(f"{why}: removing {names(earlier)} from {output_dir}", file=sys.stderr)
    remove_all(output_dir, earlier)

"""Warnings for runs that would train little or slowly, said once before training starts.

- a warm-up longer than (most of) the run: with the linear warm-up the learning rate never reaches
  ``--learning-rate`` (the recipe's 100 warm-up steps under ``--max-steps 20`` peak at a fifth of it);
- a loss mask that leaves almost nothing trained (``--loss-on``, long prompts, short answers);
- on a CPU, the thread count: PyTorch's default (one thread per core) is far slower for a narrow model on a
  shared machine. The demo's 128-wide model trained over 6x slower with the default than with one thread
  (400+ s against 55 s on 2 shared cores): OpenMP's spinning threads cost more than the small matrices gain.
"""

from __future__ import annotations

import math
import os

from ..errors import UsageError
from .distributed import world_size
from .train_options import TrainOptions

LOW_PEAK = 0.5
"""Warn when the learning rate peaks below this fraction of ``--learning-rate``."""
FEW_TRAINED = 0.05
"""Warn when the loss is on fewer than this fraction of the tokens."""
WIDTH_PER_THREAD = 256
"""``--cpu-threads auto``: one thread per this many hidden units (the demo's 128-wide model: 1 thread)."""


def planned_steps(options: TrainOptions, train_rows: int) -> int:
    """Optimizer steps the run will take: ``--max-steps``, else the epochs over ``train_rows``."""
    if options.max_steps > 0:
        return options.max_steps
    batches = math.ceil(train_rows / (options.batch_size * world_size()))
    return max(1, math.ceil(options.epochs * max(1, batches // options.grad_accum)))


def schedule_warning(options: TrainOptions, train_rows: int, learning_rate: float) -> str | None:
    """One line when the warm-up keeps the learning rate below ``LOW_PEAK`` of its value for the whole run."""
    steps = planned_steps(options, train_rows)
    if options.warmup_steps <= 0 or steps / options.warmup_steps >= LOW_PEAK:
        return None
    peak = learning_rate * steps / options.warmup_steps
    return (f"warning: --warmup-steps {options.warmup_steps} is longer than the run ({steps} steps): the learning "
            f"rate only reaches {peak:.1e} of {learning_rate:.1e} and the run learns little; lower --warmup-steps "
            f"(e.g. {max(0, steps // 10)}) or train longer")


def mask_warning(trained_tokens: int, tokens: int, rows: int) -> str | None:
    """One line when the loss mask keeps fewer than ``FEW_TRAINED`` of the tokens (counted by ``fit_to_length``)."""
    if not tokens or trained_tokens / tokens >= FEW_TRAINED:
        return None
    return (f"warning: the loss is on {100 * trained_tokens / tokens:.1f}% of the tokens ({trained_tokens} of "
            f"{tokens} in {rows} rows); see what is trained with --show-example 1, or train on more with --loss-on all")


def cpu_threads(requested: int | None, hidden_size: int) -> tuple[int, str | None]:
    """``(threads, line)``: ``requested`` (``--cpu-threads``), or one per ``WIDTH_PER_THREAD`` hidden units up to
    the cores there are, with a line saying so."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--cpu-threads must be >= 1, got {requested}")
        return requested, None
    threads = max(1, min(os.cpu_count() or 1, hidden_size // WIDTH_PER_THREAD))
    return threads, (f"cpu: {threads} thread{'s' if threads > 1 else ''} for this {hidden_size}-wide model "
                     "(fastest on a shared CPU; --cpu-threads N to change)")

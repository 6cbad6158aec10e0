"""Short-run guard-rails: warm-up longer than the run, a loss mask that trains almost nothing, CPU threads."""

import os

from perft_qlora.training.guard_rails import cpu_threads, mask_warning, planned_steps, schedule_warning
from perft_qlora.training.train_options import parse_args


def options(*extra):
    return parse_args(["--model", "m", "--data", "d.json", "--batch-size", "4", *extra])


def test_the_recipe_warm_up_under_a_short_run_is_a_warning():
    short = options("--max-steps", "20")  # the recipe's 100 warm-up steps
    line = schedule_warning(short, 1000, 1e-5)
    assert line.startswith("warning: --warmup-steps 100 is longer than the run (20 steps)")
    assert "reaches 2.0e-06 of 1.0e-05" in line and "(e.g. 2)" in line
    assert schedule_warning(options("--max-steps", "20", "--warmup-steps", "2"), 1000, 1e-5) is None
    # No --max-steps: the epochs over the rows decide (3 epochs of 60 rows in batches of 4: 45 steps).
    assert planned_steps(options(), 60) == 45 and schedule_warning(options(), 60, 1e-5) is not None
    assert schedule_warning(options(), 60 * 100, 1e-5) is None
    assert planned_steps(options("--grad-accum", "2"), 60) == 21


def test_a_mask_that_trains_almost_nothing_is_a_warning():
    line = mask_warning(30, 1000, 10)
    assert line.startswith("warning: the loss is on 3.0% of the tokens (30 of 1000 in 10 rows)")
    assert "--show-example 1" in line and "--loss-on all" in line
    assert mask_warning(100, 1000, 10) is None and mask_warning(0, 0, 0) is None  # 0 counted: the whole sequence


def test_cpu_threads_follow_the_model_width_unless_given():
    threads, line = cpu_threads(None, 128)
    assert threads == 1 and line.startswith("cpu: 1 thread for this 128-wide model") and "--cpu-threads" in line
    assert cpu_threads(None, 2048)[0] == min(8, os.cpu_count())
    assert cpu_threads(3, 128) == (3, None)

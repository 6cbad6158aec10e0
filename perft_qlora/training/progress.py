"""``TrainingProgress``: the console view of a training run, replacing the Trainer's ``ProgressCallback`` /
``PrinterCallback`` (which print every log as a raw dict, numbers in quotes, between tqdm bars).

One progress bar over the optimizer steps shows the latest loss, learning rate and tokens/s; each evaluation
prints one short aligned line above it (all on stderr, like the bar). Every logged value still reaches ``state.log_history`` and the
``--report-to`` integrations: this changes only what the console shows, and only on the main process.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

REPLACES = (ProgressCallback, PrinterCallback)


def eval_line(step: int, logs: dict) -> str:
    """``eval  step    80  loss 1.2345  perft_aux 0.0123``: fixed-width columns, so lines align."""
    parts = [f"eval  step {step:>6}", f"loss {logs['eval_loss']:.4f}"]
    if "eval_perft_aux_loss" in logs:
        parts.append(f"perft_aux {logs['eval_perft_aux_loss']:.4f}")
    if "eval_mean_token_accuracy" in logs:
        parts.append(f"token_acc {logs['eval_mean_token_accuracy']:.3f}")
    return "  ".join(parts)


def bar_postfix(logs: dict) -> dict[str, str]:
    """The bar's ``loss=… lr=… tok/s=…`` from one training log."""
    shown = {"loss": f"{logs['loss']:.4f}"}
    if "learning_rate" in logs:
        shown["lr"] = f"{logs['learning_rate']:.2e}"
    if "tokens_per_second" in logs:
        shown["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
    return shown


class TrainingProgress(TrainerCallback):
    """One bar with loss / lr / tokens/s; aligned eval lines; a one-line summary at the end."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="train",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.bar.set_postfix(bar_postfix(logs), refresh=True)
        elif "eval_loss" in logs:
            self.bar.write(eval_line(state.global_step, logs), file=sys.stderr)
        elif "train_runtime" in logs:
            self.bar.write(f"done  step {state.global_step:>6}  {logs['train_runtime']:.0f} s, "
                           f"mean loss {logs.get('train_loss', float('nan')):.4f}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

"""LLM-Adapters rows -> the prompt/completion data set TRL's ``SFTTrainer`` tokenizes.

Each row becomes ``{"prompt": template up to ``### Response:``, "completion": the rest}``, where prompt + completion
is the template's training text byte for byte (``released``: the authors' ``finetune.py`` bytes). SFTTrainer
tokenizes both, appends EOS, truncates to ``max_length`` and, with ``completion_only_loss``, masks the
prompt out of the loss. The authors' recipe trains on the whole sequence (``completion_only_loss=False``).
"""

from __future__ import annotations

from datasets import Dataset

from ..formats.chat_templates import user_message
from ..formats.prompts import DEFAULT_TEMPLATE, RESPONSE_MARKER, get_template
from ..formats.records import DataError, RecordSet


def to_prompt_completion(records: RecordSet, template: str = DEFAULT_TEMPLATE) -> Dataset:
    """One ``{"prompt", "completion"}`` example per valid row, in file order, rendered with ``template``.

    The split falls right after ``### Response:``: the whitespace that follows it (a newline, and 16 spaces in
    the released template) goes with the completion. Byte-level BPEs merge a whitespace run with the word after
    it, so a prompt ending in spaces tokenizes differently alone than inside prompt + completion; TRL then drops
    that end of the prompt (and warns). Prompt + completion stays the template's training text byte for byte.
    """
    render = get_template(template).train
    prompts, completions = [], []
    for row in records.rows:
        text = render(row["instruction"], row["input"], row["output"])
        cut = text.rindex(RESPONSE_MARKER) + len(RESPONSE_MARKER)
        prompts.append(text[:cut])
        completions.append(text[cut:])
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def to_chat_prompt_completion(records: RecordSet) -> Dataset:
    """One conversational ``{"prompt": [user turn], "completion": [assistant turn]}`` example per row, for
    ``--chat-template``: TRL renders both with the tokenizer's chat template (the turn's end token included)."""
    prompts = [[{"role": "user", "content": user_message(row["instruction"], row["input"])}] for row in records.rows]
    completions = [[{"role": "assistant", "content": row["output"]}] for row in records.rows]
    return Dataset.from_list([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])


def count_truncated(dataset: Dataset, tokenizer, max_length: int, sample: int = 2000) -> tuple[int, int]:
    """``(too_long, checked)``: how many of the first ``sample`` examples exceed ``max_length`` tokens (with EOS).

    SFTTrainer truncates from the right, so a too-long example loses the end of its response (its answer).
    """
    checked = dataset.select(range(min(sample, len(dataset))))
    lengths = [
        len(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
        if isinstance(prompt, list) else len(tokenizer(prompt + completion, add_special_tokens=False).input_ids) + 1
        for prompt, completion in zip(checked["prompt"], checked["completion"])
    ]  # a conversation (--chat-template) carries its own end-of-turn token
    return sum(length > max_length for length in lengths), len(lengths)


def split_validation(dataset: Dataset, size: int, seed: int = 42) -> tuple[Dataset, Dataset | None]:
    """``(train, validation)`` with ``size`` examples held out at random (the recipe: 120, seed 42); 0 -> no split."""
    if size <= 0:
        return dataset, None
    if size >= len(dataset):
        raise DataError(
            f"validation size {size} leaves no training rows ({len(dataset)} usable rows); "
            "pass a smaller --val-size, or 0 to train without validation"
        )
    parts = dataset.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]

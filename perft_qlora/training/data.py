"""The data set TRL's ``SFTTrainer`` tokenizes, from the ``--data`` sources in any format (``formats/detect.py``).

Conversations, prompt/completion and text rows go to TRL as its own formats (``formats/conversations.py``); TRL
applies the chat template and masks the loss (``loss_mask.py``). Before any model loads, the rows whose trained
part ``--max-length`` cuts away are listed and skipped (TRL would drop them silently, and a set left empty would
end in a sampler traceback).

LLM-Adapters rows -> the prompt/completion data set (:func:`to_prompt_completion`):

Each row becomes ``{"prompt": template up to ``### Response:``, "completion": the rest}``, where prompt + completion
is the template's training text byte for byte (``released``: the authors' ``finetune.py`` bytes). SFTTrainer
tokenizes both, appends EOS, truncates to ``max_length`` and, with ``completion_only_loss``, masks the
prompt out of the loss. The authors' recipe trains on the whole sequence (``completion_only_loss=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset, concatenate_datasets

from ..formats.chat_templates import (
    ChatTemplate,
    ChatTemplateError,
    resolve_chat_template,
    tokenizer_chat_template,
    user_message,
)
from ..formats.conversations import ExampleSet, read_examples
from ..formats.detect import parse_fields
from ..formats.prompts import DEFAULT_TEMPLATE, RESPONSE_MARKER, get_template
from ..formats.records import DataError, RecordSet
from ..quant.loader import load_tokenizer, resolve_checkpoint
from .loss_mask import IGNORE, check_chat_template, resolve_loss, token_labels, training_chat_template
from .train_options import TrainOptions


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


@dataclass
class TrainingData:
    """The examples of every ``--data`` source, concatenated, and what they are."""

    dataset: Dataset
    format: str
    """The sources' format (``formats.detect.FORMATS``; ``messages`` and ``sharegpt`` sources may be mixed)."""
    shape: str
    """``formats.conversations.example_shape`` of every example."""
    loss: str
    """``all``, ``completion`` or ``assistant`` (``loss_mask.resolve_loss``)."""
    origins: list[tuple[str, int]]
    """``(source, row number)`` of each example, for reports."""
    reports: list[str] = field(default_factory=list)
    """One per source: rows used and skipped (``RecordSet.report``)."""


def _dataset(examples: ExampleSet, template: str, as_chat: bool) -> Dataset:
    if examples.format == "llm-adapters":
        return to_chat_prompt_completion(examples) if as_chat else to_prompt_completion(examples, template)
    return Dataset.from_list(examples.rows)


def load_training_data(data: str, data_format: str = "auto", data_fields: str | None = None, split: str = "train",
                       config: str | None = None, template: str = DEFAULT_TEMPLATE, loss_on: str = "auto",
                       completion_only_loss: bool = False, as_chat: bool = False) -> TrainingData:
    """Every comma-separated source of ``data`` read (``read_examples``) and concatenated; one format for all.
    ``as_chat`` (``--chat-template``): LLM-Adapters rows become one-turn conversations (:func:`to_chat_prompt_completion`)."""
    fields = parse_fields(data_fields)
    sets = [read_examples(source.strip(), data_format, fields, split, config)
            for source in data.split(",") if source.strip()]
    if not sets:
        raise DataError("--data names no source; pass a data file or a hub data set name")
    first = sets[0]
    for other in sets[1:]:
        if other.shape != first.shape or (other.format == "llm-adapters") != (first.format == "llm-adapters"):
            raise DataError(f"{first.source} holds {first.format} rows and {other.source} {other.format} rows; "
                            "sources trained together must share a format (convert one, or train them apart)")
    shape = first.shape
    if first.format == "llm-adapters":
        shape = "conversational prompt-completion" if as_chat else "prompt-completion"
    loss = resolve_loss(shape, loss_on, completion_only_loss, llm_adapters=first.format == "llm-adapters")
    parts = [_dataset(examples, template, as_chat) for examples in sets]
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    numbers = [(s.source, n) for s in sets for n in s.numbers]
    return TrainingData(dataset, first.format, shape, loss, numbers, [s.report() for s in sets])


@dataclass
class LengthReport:
    """What ``--max-length`` leaves of the examples (:func:`fit_to_length`)."""

    kept: int
    dropped: list[tuple[str, int, int]]
    """``(source, row number, tokens before the first trained one)`` of each example left without a trained token."""
    trained_tokens: int
    tokens: int
    too_long: int

    def drop_report(self, max_length: int, max_listed: int = 10) -> str:
        lines = [f"{len(self.dropped)} rows skipped: --max-length {max_length} cuts away every token the loss is on"]
        lines += [f"  {source} row {number}: the trained part starts at token {start + 1}"
                  for source, number, start in self.dropped[:max_listed]]
        if len(self.dropped) > max_listed:
            lines.append(f"  ... and {len(self.dropped) - max_listed} more")
        return "\n".join(lines)


def fit_to_length(data: TrainingData, tokenizer, max_length: int, chat_template: str | None = None,
                  ) -> tuple[TrainingData, LengthReport]:
    """``data`` without the examples whose trained tokens all lie past ``max_length`` (listed in the report), with
    the counts of trained tokens. The whole sequence is trained with ``--loss-on all``, so nothing is dropped and
    nothing is tokenized then (LLM-Adapters' recipe path does not change)."""
    if data.loss == "all":
        return data, LengthReport(len(data.dataset), [], 0, 0, 0)
    keep, dropped, trained, tokens, too_long = [], [], 0, 0, 0
    for index, example in enumerate(data.dataset):
        ids, labels = token_labels(example, tokenizer, data.loss, chat_template)
        kept_labels = labels[:max_length]
        count = sum(label != IGNORE for label in kept_labels)
        too_long += len(ids) > max_length
        if count:
            keep.append(index)
            trained, tokens = trained + count, tokens + len(kept_labels)
        else:
            start = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
            dropped.append((*data.origins[index], start))
    report = LengthReport(len(keep), dropped, trained, tokens, too_long)
    if not keep:
        raise DataError(f"no usable rows: {report.drop_report(max_length)}; raise --max-length, or shorten the prompts")
    if dropped:
        data = TrainingData(data.dataset.select(keep), data.format, data.shape, data.loss,
                            [data.origins[i] for i in keep], data.reports)
    return data, report


@dataclass
class PreparedData:
    """What :func:`prepare_data` returns: the tokenizer, the examples that train, and the counts behind them."""

    tokenizer: object
    data: TrainingData
    lengths: LengthReport
    chat_template: str | None
    """The template TRL renders with (``loss_mask.training_chat_template``); None: the tokenizer's own."""
    chat: ChatTemplate | None = None
    """The chat template conversations are rendered with (``--chat-template``, else the base's own), recorded in
    the adapter so that evaluate, generate and the app prompt it the same way; None for plain-text data."""


def prepare_data(options: TrainOptions, model_dir: str, say=print) -> PreparedData:
    """Read every source, load the tokenizer (not the model), check the chat template and skip the rows whose
    trained part ``--max-length`` cuts away; ``say`` gets the reports."""
    data = load_training_data(options.data, options.data_format, options.data_fields, options.data_split,
                              options.data_config, options.template, options.loss_on, options.completion_only_loss,
                              as_chat=options.chat_template is not None)
    for report in data.reports:
        say(report)
    tokenizer = load_tokenizer(resolve_checkpoint(model_dir, options.revision))
    chat = None
    if options.chat_template is not None:
        chat = resolve_chat_template(options.chat_template, tokenizer)
        tokenizer.chat_template = chat.source  # TRL renders the conversations with it
        say(f"chat template {chat.name}: turns end with {chat.end_of_turn!r}")
    check_chat_template(tokenizer, data.shape)
    if chat is None and data.shape.startswith(("conversation", "conversational")):
        try:
            chat = tokenizer_chat_template(tokenizer)  # the base's own, recorded the same way
        except ChatTemplateError as error:
            say(f"warning: the base's chat template is not recorded in the adapter ({error}); loaders will prompt "
                "it with --template")
    chat_template = training_chat_template(tokenizer, data.loss)
    data, lengths = fit_to_length(data, tokenizer, options.max_length, chat_template)
    if lengths.dropped:
        say(lengths.drop_report(options.max_length))
    return PreparedData(tokenizer, data, lengths, chat_template, chat)

"""Which tokens the loss is on (``--loss-on``), and the labels TRL's ``SFTTrainer`` will build for an example.

``--loss-on auto`` trains the assistant turns of conversations (every one of a multi-turn conversation), the
completion of prompt/completion rows and everything of ``text`` rows; LLM-Adapters rows keep the recipe's
whole sequence (``--completion-only-loss`` for the response only). TRL does the masking
(``assistant_only_loss``: the chat template's ``{% generation %}`` spans; ``completion_only_loss``: the tokens after
the prompt). :func:`token_labels` computes the same labels from the tokenizer alone, before any model loads, to
skip the rows whose trained part ``--max-length`` cuts away, to warn when almost nothing is trained, and for
``train --show-example``; ``tests/test_data_formats.py`` checks it against the labels TRL builds.
"""

from __future__ import annotations

from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import common_prefix_length

from ..errors import UsageError

ALLOWED = {
    "conversation": ("assistant", "all"),
    "conversational prompt-completion": ("completion", "assistant", "all"),
    "prompt-completion": ("completion", "all"),
    "text": ("all",),
}
"""Each example shape (``formats.conversations.example_shape``) and the losses it takes, the ``auto`` one first."""
IGNORE = -100


def resolve_loss(shape: str, loss_on: str, completion_only_loss: bool = False, llm_adapters: bool = False) -> str:
    """``all``, ``completion`` or ``assistant`` for data of ``shape``; a :class:`UsageError` for a loss it lacks."""
    if completion_only_loss and loss_on == "all":
        raise UsageError("--completion-only-loss and --loss-on all disagree; pass one of them")
    if llm_adapters and loss_on == "auto":  # the paper's data: the recipe's whole sequence
        return "completion" if completion_only_loss else "all"
    allowed = ALLOWED[shape]
    if completion_only_loss and loss_on == "auto":  # the response only: a conversation's is its assistant turns
        if "completion" not in allowed and "assistant" not in allowed:
            raise UsageError(f"--completion-only-loss does not apply to {shape} rows (no response to single out); "
                             "pass --no-completion-only-loss")
        loss_on = "completion" if "completion" in allowed else "assistant"
    if loss_on == "auto":
        return allowed[0]
    if loss_on not in allowed:
        raise UsageError(f"--loss-on {loss_on} does not apply to {shape} rows; use one of: {', '.join(allowed)}")
    return loss_on


def training_chat_template(tokenizer, loss: str) -> str | None:
    """The template TRL renders with: None (the tokenizer's own) unless the loss is on assistant turns and the
    tokenizer's template lacks ``{% generation %}`` markers, when TRL swaps in its training version of a known
    template. An unknown template without markers is refused here, in one line, instead of in the trainer."""
    if loss != "assistant" or has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise UsageError(
            "the chat template marks no assistant turns ({% generation %} ... {% endgeneration %}), so the loss "
            "cannot be put on them; use a template that does (--chat-template), or --loss-on all"
        ) from None


def check_chat_template(tokenizer, shape: str) -> None:
    """Conversations need a chat template; a base model without one is refused, naming the option that gives one."""
    if shape.startswith(("conversation", "conversational")) and not tokenizer.chat_template:
        raise UsageError(f"{shape} rows need a chat template and this model's tokenizer has none; "
                         "pass --chat-template (e.g. chatml), or give the rows as prompt/completion strings")


def _render(tokenizer, messages: list, chat_template: str | None, **kwargs) -> dict:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=chat_template,
                                         **kwargs)


def token_labels(example: dict, tokenizer, loss: str, chat_template: str | None = None) -> tuple[list, list]:
    """``(input_ids, labels)`` as TRL's ``SFTTrainer`` prepares ``example`` (before truncation): labels are the ids,
    or ``IGNORE`` where the loss is off. ``chat_template``: :func:`training_chat_template`'s."""
    assistant = loss == "assistant"
    if "messages" in example:
        out = _render(tokenizer, example["messages"], chat_template, return_assistant_tokens_mask=assistant)
        ids, mask = out["input_ids"], out["assistant_masks"] if assistant else None
    elif "prompt" in example:
        if isinstance(example["prompt"], list):  # conversational: the template ends every turn, no EOS added
            prompt_ids = _render(tokenizer, example["prompt"], chat_template, add_generation_prompt=True)["input_ids"]
            out = _render(tokenizer, example["prompt"] + example["completion"], chat_template,
                          return_assistant_tokens_mask=assistant)
            ids, mask = out["input_ids"], out["assistant_masks"] if assistant else None
        else:
            prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
            ids = tokenizer(text=example["prompt"] + _with_eos(example["completion"], tokenizer))["input_ids"]
            mask = None
        if loss == "completion":
            start = common_prefix_length(prompt_ids, ids)
            mask = [0] * start + [1] * (len(ids) - start)
    else:
        ids, mask = tokenizer(text=_with_eos(example["text"], tokenizer))["input_ids"], None
    labels = list(ids) if mask is None else [token if bit else IGNORE for token, bit in zip(ids, mask)]
    return list(ids), labels


def _with_eos(text: str, tokenizer) -> str:
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def marked_example(ids: list, labels: list, tokenizer, max_length: int) -> str:
    """The example as text with its trained tokens in ``[[...]]``, and what ``--max-length`` cuts off."""
    spans, current, trained = [], [], None
    for token, label in zip(ids[:max_length], labels[:max_length]):
        if trained is not None and (label != IGNORE) != trained:
            spans.append((trained, current))
            current = []
        current.append(token)
        trained = label != IGNORE
    if current:
        spans.append((trained, current))
    text = "".join(f"[[{tokenizer.decode(part)}]]" if on else tokenizer.decode(part) for on, part in spans)
    count = sum(label != IGNORE for label in labels[:max_length])
    cut = f"; {len(ids) - max_length} more cut off by --max-length {max_length}" if len(ids) > max_length else ""
    return f"{text}\n--- {min(len(ids), max_length)} tokens, {count} trained (in [[...]]){cut}"

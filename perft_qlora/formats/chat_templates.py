"""Chat templates for bases that have none: ``--chat-template chatml | alpaca | FILE.jinja``, resolved per tokenizer.

A chat template turns a conversation (``[{"role": ..., "content": ...}]``) into the text the model sees; the
tokenizer's ``apply_chat_template`` renders it, TRL's ``SFTTrainer`` trains on it and evaluation, the app and
:class:`~perft_qlora.serving.generator.Generator` prompt with it. The named templates mark every assistant
turn with ``{% generation %}`` ... ``{% endgeneration %}`` (the end-of-turn token inside), so TRL's
``assistant_only_loss=True`` finds the assistant tokens and trains the model to stop.

**The end-of-turn token.** Generation must stop on the token the template ends an assistant turn with. Adding a
token (ChatML's ``<|im_end|>``) to a base that lacks it would need a new embedding row and a new LM-head row: the
base is frozen (NF4), the adapter saves only its own weights, so that row would stay random and be lost at save.
So no token is ever added. ``chatml`` ends a turn with ``<|im_end|>`` when the tokenizer already has it as one
token (Qwen, OLMoE-Instruct vocabularies), else with the tokenizer's own end-of-sequence token (the shipped demo
base: ``<|endoftext|>``); ``alpaca`` always ends with the end-of-sequence token. A template file must end the
assistant turn with one special token of the tokenizer (``{{ eos_token }}`` always works), or it is refused.

The resolved template (its Jinja text and the end-of-turn token) is recorded in the adapter
(``perft_config.json``: ``extra.training.chat_template``, :meth:`ChatTemplate.to_record`), and every loader uses
that record, so a model is queried exactly the way it was trained even when the file is gone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import PerftQloraError

CHATML_END = "<|im_end|>"

_CHATML = """{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' -}}
{%- if message['role'] == 'assistant' -%}
{% generation %}{{- message['content'] + eot -}}{% endgeneration %}
{%- else -%}
{{- message['content'] + eot -}}
{%- endif -%}
{{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""

_ALPACA = """{%- if messages[0]['role'] != 'system' -%}
{{- 'Below is an instruction that describes a task. '
    'Write a response that appropriately completes the request.\\n\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{- message['content'] + '\\n\\n' -}}
{%- elif message['role'] == 'user' -%}
{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}
{%- elif message['role'] == 'assistant' -%}
{{- '### Response:\\n' -}}
{% generation %}{{- message['content'] + eot -}}{% endgeneration %}
{{- '\\n\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"""

NAMED: dict[str, tuple[str, str | None]] = {
    "chatml": (_CHATML, CHATML_END),
    "alpaca": (_ALPACA, None),
}
"""Name -> (Jinja body using the variable ``eot``, the preferred end-of-turn token; None: the tokenizer's EOS)."""

_PROBE = "PERFT-PROBE-ANSWER"


class ChatTemplateError(PerftQloraError):
    """A ``--chat-template`` that is neither a known name nor a usable Jinja file, or does not fit the tokenizer."""


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template resolved for one tokenizer."""

    name: str
    """``chatml``, ``alpaca``, or the file it was read from."""
    source: str
    """The Jinja text set as ``tokenizer.chat_template``."""
    end_of_turn: str
    """The token that ends an assistant turn: generation stops on it."""

    def to_record(self) -> dict:
        return {"name": self.name, "source": self.source, "end_of_turn": self.end_of_turn}

    @classmethod
    def from_record(cls, training: dict) -> ChatTemplate | None:
        """The template a training record (``extra.training``) holds, or None when it was trained without one."""
        record = training.get("chat_template") if isinstance(training, dict) else None
        if not isinstance(record, dict):
            return None
        return cls(record["name"], record["source"], record["end_of_turn"])


def _option(spec: str) -> str:
    return f"--chat-template {spec}"


def read_chat_template(spec: str) -> tuple[str, str, str | None]:
    """``(name, body, preferred end-of-turn)`` for a named template or a Jinja file, checked before any model loads:
    the name is known or the file exists, reads as text and compiles as Jinja."""
    if spec in NAMED:
        return (spec, *NAMED[spec])
    if not os.path.isfile(spec):
        raise ChatTemplateError(f"{_option(spec)}: no such file or named template; pass one of {', '.join(NAMED)} "
                                "or the path of a Jinja file")
    try:
        with open(spec, encoding="utf-8") as handle:
            body = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ChatTemplateError(f"{_option(spec)}: cannot read the file ({error}); pass a UTF-8 Jinja file") from error
    _render(body, [{"role": "user", "content": "hi"}], spec, eos_token="</s>", bos_token="<s>")
    return spec, body, None


def _render(source: str, messages: list[dict], spec: str, **tokens) -> str:
    """The template rendered without a tokenizer (transformers' sandboxed Jinja, the same as apply_chat_template)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=source,
                                            add_generation_prompt=True, **tokens)
    except Exception as error:  # jinja2 raises TemplateSyntaxError, UndefinedError, TypeError ...
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ChatTemplateError(f"{_option(spec)} does not render a conversation ({first}); fix the Jinja") from error
    return rendered[0]


def _is_one_token(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] in _special_ids(tokenizer)


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())


def resolve_chat_template(spec: str, tokenizer) -> ChatTemplate:
    """``--chat-template`` for ``tokenizer``: the Jinja text (no token added, see the module doc) and its end-of-turn
    token, checked by rendering a user turn and an assistant turn with the tokenizer."""
    name, body, preferred = read_chat_template(spec)
    if tokenizer.eos_token is None:
        raise ChatTemplateError(f"{_option(spec)}: the tokenizer has no end-of-sequence token to end a turn with")
    if name in NAMED:
        end = preferred if preferred is not None and _is_one_token(tokenizer, preferred) else tokenizer.eos_token
        source = "{%- set eot = " + json.dumps(end, ensure_ascii=False) + " -%}\n" + body
    else:
        source = body
    return ChatTemplate(name, source, _end_of_turn(tokenizer, source, _option(spec)))


def tokenizer_chat_template(tokenizer) -> ChatTemplate:
    """The tokenizer's own chat template as a :class:`ChatTemplate` (name ``tokenizer``), for conversational data
    trained without ``--chat-template``: recorded like a chosen one, so loaders stop on the same token."""
    if not getattr(tokenizer, "chat_template", None) or not isinstance(tokenizer.chat_template, str):
        raise ChatTemplateError("the tokenizer has no chat template; pass --chat-template chatml, alpaca or a Jinja file")
    return ChatTemplate("tokenizer", tokenizer.chat_template,
                        _end_of_turn(tokenizer, tokenizer.chat_template, "the tokenizer's chat template"))


def _end_of_turn(tokenizer, source: str, what: str) -> str:
    """The special token ``source`` ends an assistant turn with (rendered with ``tokenizer``), or ChatTemplateError."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
    except Exception as error:  # any Jinja failure is the template's
        raise ChatTemplateError(f"{what} does not render a conversation ({error}); fix the Jinja") from error
    if _PROBE not in text:
        raise ChatTemplateError(f"{what} drops the assistant's message; render message['content'] for every turn")
    tail = text.split(_PROBE, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False).input_ids
    if not ids or ids[0] not in _special_ids(tokenizer):
        raise ChatTemplateError(
            f"{what} ends an assistant turn with {tail[:20]!r}, not with a special token of this tokenizer, "
            f"so generation could not stop there; end the turn with {{{{ eos_token }}}} ({tokenizer.eos_token!r})")
    return tokenizer.convert_ids_to_tokens(ids[0])


def stop_token_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """The ids generation stops on: the template's end-of-turn token, then the tokenizer's EOS (if different)."""
    ids = [tokenizer.convert_tokens_to_ids(template.end_of_turn)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def user_message(instruction: str, input: str = "") -> str:
    """One user turn for an LLM-Adapters instruction and its optional input (a blank input is no input)."""
    return f"{instruction}\n\n{input}" if input and input.strip() else instruction


def conversation_prompt(tokenizer, template: ChatTemplate, messages: list[dict]) -> str:
    """``messages`` rendered with ``template``, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                         add_generation_prompt=True)


def instruction_prompt(tokenizer, template: ChatTemplate, instruction: str, input: str = "") -> str:
    """The generation prompt for one instruction (and input), as training rendered LLM-Adapters rows."""
    return conversation_prompt(tokenizer, template, [{"role": "user", "content": user_message(instruction, input)}])

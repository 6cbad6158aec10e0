"""Evaluation protocols: how prompts are built and decoded per task family.

``perft`` is the default: the PERFT authors' released evaluation (../shared/docs/perft-method.md,
"Evaluation in the released scripts"); it scores the text after the last ``### Response:``.
``llm-adapters`` is LLM-Adapters' own commonsense script (empty response slot, 32 new tokens) and, as its
``output.split("### Response:")[1]``, scores the text after the first one. Both decode math the same way
and use 4-beam search; ``--greedy`` replaces it with one beam for quick looks. Prompts use a template from
``prompts.py`` (``released`` by default; evaluation uses the adapter's). The summary records all of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..formats.chat_templates import ChatTemplate, instruction_prompt, stop_token_ids
from ..formats.prompts import DEFAULT_TEMPLATE, get_template, response_text

COMMONSENSE_PREFIX = "the correct answer is"
"""Commonsense170K outputs read ``the correct answer is <label>``; the PERFT scripts pre-fill this much."""


@dataclass(frozen=True)
class Decoding:
    response_prefix: str
    """Text placed in the response slot before generation (part of the scored response)."""
    max_new_tokens: int
    """Tokens generated after the prompt."""


@dataclass(frozen=True)
class Protocol:
    name: str
    families: dict[str, Decoding]
    """Decoding per task family (``commonsense``, ``math``)."""
    num_beams: int = 4
    """Beam-search width; 1 is greedy decoding."""
    split: str = "last"
    """Which ``### Response:`` the scored text follows: ``last`` (PERFT) or ``first`` (LLM-Adapters)."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template name (``prompts.TEMPLATES``); unused when ``chat`` is set."""
    chat: ChatTemplate | None = None
    """The chat template an adapter was trained with (``--chat-template``): prompts are its generation prompt for
    the row as one user turn, generation stops on its end-of-turn token. Set with :meth:`with_chat`."""
    tokenizer: object = dataclasses.field(default=None, compare=False, repr=False)
    """The tokenizer that renders ``chat``."""

    def decoding(self, family: str) -> Decoding:
        return self.families[family]

    def prompt(self, family: str, row: dict[str, str]) -> str:
        """The evaluation prompt of ``self.template`` (or ``self.chat``) for ``row``, then the family's prefix."""
        prefix = self.families[family].response_prefix
        if self.chat is not None:
            return instruction_prompt(self.tokenizer, self.chat, row["instruction"], row.get("input", "")) + prefix
        render = get_template(self.template).eval
        return render(row["instruction"], row.get("input", ""), prefix)

    def scored_response(self, prompt: str, generated: str, family: str | None = None) -> str:
        """What is scored: the response part of prompt + generation (the prefix included), split as the source does;
        with a chat template, the family's prefix + the generation (the turn is all response)."""
        if self.chat is not None and family is not None:
            return (self.families[family].response_prefix + generated).strip()
        return response_text(prompt + generated, self.split)

    def generate_options(self) -> dict:
        """Extra ``generate_batch`` arguments: with a chat template, stop on its end-of-turn token and add no special
        tokens (the template writes its own)."""
        if self.chat is None:
            return {}
        return {"eos_token_id": stop_token_ids(self.tokenizer, self.chat), "add_special_tokens": False}

    def with_chat(self, chat: ChatTemplate, tokenizer) -> Protocol:
        return dataclasses.replace(self, chat=chat, tokenizer=tokenizer)

    def with_template(self, template: str) -> Protocol:
        get_template(template)  # an unknown name fails here
        return dataclasses.replace(self, template=template)

    def with_beams(self, num_beams: int) -> Protocol:
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        return dataclasses.replace(self, num_beams=num_beams)

    def with_max_new_tokens(self, max_new_tokens: int) -> Protocol:
        """Every family's token budget replaced by ``max_new_tokens`` (quick looks; no longer the paper's)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        families = {f: dataclasses.replace(d, max_new_tokens=max_new_tokens) for f, d in self.families.items()}
        return dataclasses.replace(self, families=families)

    def to_dict(self) -> dict:
        """What the summary records: protocol name, beams and per-family prefix / token budget."""
        return {
            "protocol": self.name,
            "num_beams": self.num_beams,
            "template": self.template,
            "split": self.split,
            "do_sample": False,
            "families": {family: dataclasses.asdict(decoding) for family, decoding in self.families.items()},
            **({"chat_template": self.chat.name} if self.chat is not None else {}),
        }


def scored_response(prompt: str, generated: str) -> str:
    """The ``perft`` protocol's scoring: the text after the last ``### Response:`` of prompt + generation."""
    return response_text(prompt + generated)


_MATH = Decoding(response_prefix="", max_new_tokens=256)

PROTOCOLS: dict[str, Protocol] = {
    "perft": Protocol("perft", {"commonsense": Decoding(COMMONSENSE_PREFIX, 4), "math": _MATH}),
    "llm-adapters": Protocol("llm-adapters", {"commonsense": Decoding("", 32), "math": _MATH}, split="first"),
}

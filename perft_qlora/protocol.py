"""Evaluation protocols: how prompts are built and decoded per task family.

``perft`` is the default: the PERFT authors' released evaluation (../shared/docs/perft-method.md,
"Evaluation in the released scripts"). ``llm-adapters`` is LLM-Adapters' own commonsense script (empty
response slot, 32 new tokens); both decode math the same way. Both use 4-beam search; ``--greedy``
replaces it with one beam for quick looks, and the summary records which settings produced the numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .prompts import format_prompt, response_text

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

    def decoding(self, family: str) -> Decoding:
        return self.families[family]

    def prompt(self, family: str, row: dict[str, str]) -> str:
        """The LLM-Adapters template for ``row`` with the family's response prefix."""
        return format_prompt(row["instruction"], row.get("input", ""), self.families[family].response_prefix)

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
            "do_sample": False,
            "families": {family: dataclasses.asdict(decoding) for family, decoding in self.families.items()},
        }


def scored_response(prompt: str, generated: str) -> str:
    """What is scored: the text after the last ``### Response:`` of prompt + generation (the prefix included)."""
    return response_text(prompt + generated)


_MATH = Decoding(response_prefix="", max_new_tokens=256)

PROTOCOLS: dict[str, Protocol] = {
    "perft": Protocol("perft", {"commonsense": Decoding(COMMONSENSE_PREFIX, 4), "math": _MATH}),
    "llm-adapters": Protocol("llm-adapters", {"commonsense": Decoding("", 32), "math": _MATH}),
}

"""Generator: a model, its tokenizer and the prompt template its adapter was trained with; answers stream.

The one public call for generation (``perft_qlora.Generator``) and the engine of ``python -m perft_qlora.generate``::

    from perft_qlora import Generator

    generate = Generator.load("perft-demo/base", adapter="perft-demo/adapter")  # NF4 base + the adapter
    print(generate("Is the following text written in small letters? Answer format: true/false", "IQQ SFVP"))
    for piece in generate.stream("Repeat the text.", "hello"):  # text as it is generated
        print(piece, end="", flush=True)

An instruction (and its optional input) is rendered with the template the adapter recorded at training
(``extra.training.template``; ``released`` for the base model and adapters that record none), the way
evaluation renders it, so the model sees the bytes it was trained on. A raw prompt in another layout gets
the wrong answer from a model fine-tuned on one template. An adapter trained with ``--chat-template``
recorded that template (``extra.training.chat_template``): the instruction is then one user turn rendered
through it, and generation stops on its end-of-turn token.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import TextIteratorStreamer

from ..errors import UsageError
from ..formats.chat_templates import ChatTemplate, instruction_prompt, stop_token_ids
from ..formats.prompts import DEFAULT_TEMPLATE, get_template
from ..method.adapters import attach_saved_adapter, training_record


def recorded_template(adapter: str | None) -> str | None:
    """The template the adapter in directory ``adapter`` was trained with; None if unrecorded or no adapter."""
    return training_record(adapter).get("template") if adapter is not None else None


def recorded_chat_template(adapter: str | None) -> ChatTemplate | None:
    """The chat template the adapter in directory ``adapter`` was trained with; None if none or no adapter."""
    return ChatTemplate.from_record(training_record(adapter)) if adapter is not None else None


def choose_template(requested: str | None, adapter: str | None) -> tuple[str, str | None]:
    """``(template, warning)``: ``requested`` if given (with a warning when the adapter recorded another one),
    else the adapter's recorded template, else ``released``."""
    trained = recorded_template(adapter)
    if requested is not None:
        get_template(requested)  # an unknown name fails here
        warning = None
        if trained is not None and trained != requested:
            warning = (f"adapter {adapter} was trained with the {trained!r} template; prompting it with {requested!r} "
                       "as --template asks")
        return requested, warning
    return trained or DEFAULT_TEMPLATE, None


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy (deterministic) by default, or sampled at ``temperature`` / ``top_p``."""

    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise UsageError(f"temperature must be > 0 when sampling, got {self.temperature}; or use greedy decoding")
        if not self.greedy and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        return sampling_kwargs(self.max_new_tokens, self.greedy, self.temperature, self.top_p)


def sampling_kwargs(max_new_tokens: int, greedy: bool, temperature: float, top_p: float) -> dict:
    """``model.generate`` keyword arguments: greedy, or sampled at ``temperature`` / ``top_p`` (also the app's)."""
    if greedy:
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": float(temperature),
            "top_p": float(top_p)}


class Generator:
    """Answers instructions with ``model`` in the prompt ``template`` it was trained with.

    Args:
        model: a causal LM (``load_model``'s, with or without an attached adapter, or any transformers model).
        tokenizer: its tokenizer.
        template: ``released`` or ``alpaca`` (``perft_qlora.formats.prompts.TEMPLATES``); for an adapter use
            :meth:`load`, which reads the one it recorded.
        chat: a chat template (``formats.chat_templates``) that replaces ``template``: prompts are one user turn
            through it and generation stops on its end-of-turn token; :meth:`load` reads the adapter's.
    """

    def __init__(self, model, tokenizer, template: str = DEFAULT_TEMPLATE, chat: ChatTemplate | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template)
        self.chat = chat

    @classmethod
    def load(cls, model: str, adapter: str | None = None, *, template: str | None = None, device=None,
             quantize: str = "nf4") -> Generator:
        """Load base ``model`` (NF4 by default) and the PERFT or peft ``adapter`` saved in that directory (None:
        the base model), prompting in the adapter's recorded template unless ``template`` overrides it (a
        ``UserWarning`` says so when the adapter recorded another)."""
        chosen, warning = choose_template(template, adapter)
        chat = recorded_chat_template(adapter)
        if template is not None and chat is not None:
            warning = (f"adapter {adapter} was trained with the chat template {chat.name!r}; prompting it with "
                       f"{template!r} as template= asks")
            chat = None
        if warning:
            warnings.warn(warning, stacklevel=2)
        return cls.load_with(model, adapter, chosen, device=device, quantize=quantize, chat=chat)

    @classmethod
    def load_with(cls, model: str, adapter: str | None, template: str, *, device=None, quantize: str = "nf4",
                  chat: ChatTemplate | None = None):
        """:meth:`load` with the template (and chat template) already chosen, no warning."""
        from ..quant.loader import load_model

        base, tokenizer = load_model(model, quantize=quantize, device=device)
        return cls(attach_saved_adapter(base, adapter) if adapter is not None else base, tokenizer, template, chat)

    def prompt(self, instruction: str, input: str = "") -> str:
        """The model input for ``instruction`` and its optional ``input`` (the template's generation prompt)."""
        if not instruction.strip():
            raise UsageError("the instruction is empty; pass the text to answer")
        if self.chat is not None:
            return instruction_prompt(self.tokenizer, self.chat, instruction, input)
        return self.template.eval(instruction, input, "")

    def stream(self, instruction: str, input: str = "", sampling: Sampling | None = None, **options) -> Iterator[str]:
        """Yield the answer's text as it is generated (special tokens removed); ``options`` are
        :class:`Sampling`'s fields (``max_new_tokens``, ``greedy``, ``temperature``, ``top_p``)."""
        sampling = sampling or Sampling(**options)
        # A chat template writes its own special tokens.
        encoded = self.tokenizer(self.prompt(instruction, input), return_tensors="pt",
                                 add_special_tokens=self.chat is None).to(self.model.device)
        stop = {"eos_token_id": stop_token_ids(self.tokenizer, self.chat)} if self.chat is not None else {}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**encoded, streamer=streamer, pad_token_id=self._pad_token_id(),
                                        **stop, **sampling.generate_kwargs())
            except BaseException as error:  # noqa: BLE001  re-raised in the consumer's thread below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if failure:
            raise failure[0]

    def __call__(self, instruction: str, input: str = "", sampling: Sampling | None = None, **options) -> str:
        """The whole answer, stripped."""
        return "".join(self.stream(instruction, input, sampling, **options)).strip()

    def _pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

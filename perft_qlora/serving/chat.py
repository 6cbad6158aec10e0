"""``ChatModel``: one NF4 base model shared by any number of named adapters, with streaming replies.

The base is loaded once. Registering an adapter loads it with :func:`load_adapter` (all checks), keeps its
config and tensors in memory and detaches it again; a request for that adapter re-attaches it with
:func:`attach_perft` and copies the kept tensors in, so the base is never reloaded and no file is re-read.
Requests on the shared model are serialized by one lock, taken by the generation thread itself, so a client
that goes away never leaves the lock held for longer than its generation.

Each reply streams through transformers' ``TextIteratorStreamer`` from a worker thread, stops when its
cancel event is set, reports tokens/s, and records which experts routed every generated token (forward
hooks on the routers' instances, removed after the request).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..errors import PerftQloraError
from ..formats.chat_templates import ChatTemplate, conversation_prompt, stop_token_ids, user_message
from ..formats.prompts import DEFAULT_TEMPLATE, get_template
from ..method.adapter_bank import AdapterBank, BankedAdapter
from ..method.adapters import recorded_training
from ..method.checkpoint import AdapterError
from ..method.model import iter_perft_blocks
from ..method.recorder import RouterRecorder
from ..quant.arch import get_arch
from ..quant.loader import load_model
from .generator import sampling_kwargs

BASE = "base"
"""Name of the base model's column; no adapter may take it."""
STYLES = {"template": "LLM-Adapters template", "chat": "tokenizer chat template"}
"""Prompt styles: key -> label."""

Expert = tuple[int, float]
"""(expert id, gate weight)."""


class ChatError(PerftQloraError):
    """A request the chat model cannot serve (bad settings, no chat template, unknown adapter, ...)."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    """Upper bound on generated tokens per reply."""
    temperature: float = 0.7
    """Sampling temperature (ignored when greedy)."""
    top_p: float = 0.9
    """Nucleus sampling mass (ignored when greedy)."""
    greedy: bool = True
    """Pick the most likely token at each step (deterministic)."""

    def __post_init__(self) -> None:
        self.max_new_tokens, self.greedy = int(self.max_new_tokens), bool(self.greedy)
        if not 1 <= self.max_new_tokens <= 4096:
            raise ChatError(f"max new tokens must be between 1 and 4096, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ChatError(f"temperature must be > 0 when sampling, got {self.temperature}; or tick greedy")
        if not self.greedy and not 0 < self.top_p <= 1:
            raise ChatError(f"top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        return sampling_kwargs(self.max_new_tokens, self.greedy, self.temperature, self.top_p)


@dataclass
class RoutingTrace:
    """Which experts routed each generated token, per layer (the position that predicted the token)."""

    tokens: list[str]
    """Decoded text of each generated token."""
    token_ids: list[int]
    """The generated token ids."""
    base: dict[int, list[list[Expert]]]
    """layer -> per token, the base router's top-K experts, heaviest first."""
    peft: dict[int, list[list[Expert]]] = field(default_factory=dict)
    """layer -> per token, the chosen PEFT experts, heaviest first (empty for the base model)."""
    num_base_experts: int = 0
    num_peft_experts: int = 0
    variant: str | None = None


@dataclass
class StreamUpdate:
    text: str
    """The reply so far."""
    num_tokens: int
    """Tokens generated so far."""
    tokens_per_s: float
    """num_tokens over the time since generation started (prompt processing included)."""
    done: bool = False
    cancelled: bool = False
    trace: RoutingTrace | None = None
    """Set on the final update."""

    def summary(self) -> str:
        state = " · stopped" if self.cancelled else ("" if self.done else " …")
        return f"{self.num_tokens} tokens · {self.tokens_per_s:.1f} tokens/s{state}"


class _CancelAndCount(StoppingCriteria):
    """Stops generation once ``cancel`` is set; counts generated tokens and times the latest one."""

    def __init__(self, prompt_length: int, cancel: threading.Event):
        self.prompt_length, self.cancel = prompt_length, cancel
        self.count, self.start, self.last = 0, time.perf_counter(), time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.count, self.last = input_ids.shape[-1] - self.prompt_length, time.perf_counter()
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    def rate(self) -> float:
        return self.count / max(self.last - self.start, 1e-9) if self.count else 0.0


def routing_trace(recorder: RouterRecorder, token_ids: list[int], tokens: list[str], **facts) -> RoutingTrace:
    """The per-token trace of one generation recorded with ``RouterRecorder(model, last_token_only=True)``:
    forward step ``j`` (batch size 1) computed the position that picked generated token ``j``."""
    n = len(token_ids)

    def steps(calls) -> list[list[Expert]]:
        return [sorted(zip(idx[0].tolist(), w[0].tolist()), key=lambda e: -e[1]) for w, idx in calls[:n]]

    return RoutingTrace(tokens=tokens, token_ids=token_ids, base={i: steps(c) for i, c in recorder.base.items()},
                        peft={i: steps(c) for i, c in recorder.peft.items()}, **facts)


def message_text(message: dict) -> str:
    """Text of an OpenAI-style message whose content is a string or a list of ``{"type": "text"}`` parts."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def user_content(message: str, context: str = "") -> str:
    """How a turn with an optional input/context reads in a chat history (as training renders a row's input)."""
    return user_message(message, context)


class ChatModel:
    """A frozen base model, its tokenizer, and named adapters served one request at a time."""

    def __init__(self, model, tokenizer, name: str = "base model"):
        self.tokenizer, self.name = tokenizer, name
        try:
            self.bank = AdapterBank(model)
        except AdapterError as err:
            raise ChatError(str(err)) from None
        self.arch = get_arch(model.config)
        self._lock = threading.Lock()
        self._cancels: weakref.WeakValueDictionary[str, threading.Event] = weakref.WeakValueDictionary()

    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, quantize: str = "nf4") -> ChatModel:
        """Load the base model once (NF4 by default)."""
        model, tokenizer = load_model(name_or_path, quantize=quantize, device=device, progress=True)
        return cls(model, tokenizer, name=name_or_path)

    @property
    def model(self):
        """The base model with the active adapter on it (the bank swaps adapters in place)."""
        return self.bank.model

    @property
    def adapters(self) -> dict[str, BankedAdapter]:
        return self.bank.entries

    @property
    def active(self) -> str:
        return self.bank.active or BASE

    @property
    def names(self) -> list[str]:
        """Column names: the base model first, then adapters in registration order."""
        return [BASE, *self.adapters]

    # -- adapters -------------------------------------------------------------------------------------
    def register_adapter(self, name: str, directory: str) -> None:
        """Validate ``directory`` against the base and keep it under ``name``; raises ``AdapterError``."""
        name = name.strip()
        if not name or name == BASE or name in self.adapters:
            taken = "is reserved for the base model" if name == BASE else "is already registered"
            raise AdapterError(f"adapter name {name!r} {taken if name else 'is empty'}; pick another NAME in NAME=DIR")
        with self._lock:
            self.bank.register(name, directory)

    def register_many(self, specs: dict[str, str]) -> dict[str, str]:
        """Register each ``name -> directory``; returns ``name -> error message`` for those that failed."""
        errors = {}
        for name, directory in specs.items():
            try:
                self.register_adapter(name, directory)
            except AdapterError as err:
                errors[name] = str(err)
        return errors

    def info(self, name: str) -> dict:
        """Variant, knobs, trainable/activated parameters and the adapter's saved metadata."""
        if name == BASE:
            r = self.bank.base_report
            return {"name": BASE, "model": self.name, "model_type": self.arch.model_type,
                    "backbone_parameters": r.backbone, "backbone_parameters_per_token": r.backbone_per_token}
        entry = self._adapter(name)
        r = entry.report
        return {
            "name": name, "directory": entry.directory, "variant": entry.variant,
            "knobs": entry.knobs, "trainable_parameters": r.trainable,
            "activated_parameters_per_token": r.trainable_per_token, "activated_ratio": r.activated_ratio,
            "backbone_parameters_per_token": r.backbone_per_token, "adapter_config": entry.metadata,
        }

    def _adapter(self, name: str) -> BankedAdapter:
        if name not in self.adapters:
            raise ChatError(f"unknown adapter {name!r}; registered: {', '.join(self.names)}")
        return self.adapters[name]

    def _template(self, name: str | None) -> str:
        """The prompt template adapter ``name`` was trained with (recorded by training), else the default."""
        entry = self.adapters.get(name) if name is not None else None
        trained = recorded_training(entry.metadata).get("template") if entry is not None else None
        return trained or DEFAULT_TEMPLATE

    def _chat_template(self, name: str | None) -> ChatTemplate | None:
        """The chat template adapter ``name`` was trained with (``train --chat-template``), else None."""
        entry = self.adapters.get(name) if name is not None else None
        return ChatTemplate.from_record(recorded_training(entry.metadata)) if entry is not None else None

    def _activate(self, name: str) -> None:
        """Put adapter ``name`` (or the bare base) on the model; call with the lock held."""
        if name != BASE:
            self._adapter(name)
        self.bank.activate(None if name == BASE else name)

    # -- prompts --------------------------------------------------------------------------------------
    def build_prompt(self, history: list[dict], message: str, style: str = "template", context: str = "",
                     name: str | None = None) -> str:
        """The model input for ``message`` (and its optional ``context``) after ``history`` (OpenAI-style messages).

        ``template``: the LLM-Adapters template, ``message`` as the instruction and ``context`` as its input,
        without the history (adapters are trained single-turn); ``chat``: the tokenizer's chat template over the
        whole conversation, ``context`` appended to the message. An adapter trained with a chat template is
        prompted through that template, over the whole conversation, in either style.
        """
        if style not in STYLES:
            raise ChatError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")
        trained_chat = self._chat_template(name)
        if trained_chat is not None:
            messages = [{"role": m["role"], "content": message_text(m)} for m in history]
            messages.append({"role": "user", "content": user_content(message, context)})
            return conversation_prompt(self.tokenizer, trained_chat, messages)
        if style == "template":  # the template adapter ``name`` was trained with (the base: the default)
            return get_template(self._template(name)).eval(message, context, "")
        if style != "chat":
            raise ChatError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatError(f"the tokenizer of {self.name} has no chat template; choose the {STYLES['template']}")
        messages = [{"role": m["role"], "content": message_text(m)} for m in history]
        messages.append({"role": "user", "content": user_content(message, context)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- generation -----------------------------------------------------------------------------------
    def new_request(self, key: str) -> threading.Event:
        """A fresh cancel event for client ``key`` (e.g. a browser session); ``cancel(key)`` sets it.

        Only weakly kept: the entry goes away with the request that holds the event.
        """
        event = threading.Event()
        self._cancels[key] = event
        return event

    def cancel(self, key: str) -> bool:
        """Stop client ``key``'s running request; returns whether there was one."""
        event = self._cancels.get(key)
        if event is None:
            return False
        event.set()
        return True

    def stream(self, name: str, prompt: str, settings: GenerationSettings, cancel: threading.Event | None = None,
               add_special_tokens: bool = True) -> Iterator[StreamUpdate]:
        """Generate a reply to ``prompt`` with adapter ``name``, yielding the text as it grows.

        ``add_special_tokens=False`` for prompts from a chat template, which carry their own special tokens.
        """
        if name != BASE:
            self._adapter(name)
        cancel = cancel or threading.Event()
        encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
        input_ids = encoded.input_ids.to(self.model.device)  # (1, S)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        criteria = _CancelAndCount(input_ids.shape[-1], cancel)
        result: dict = {}
        args = (name, input_ids, encoded.attention_mask.to(self.model.device), settings, streamer, criteria, result)
        thread = threading.Thread(target=self._generate, args=args, daemon=True)
        thread.start()
        text = ""
        try:
            for chunk in streamer:
                text += chunk
                yield StreamUpdate(text, criteria.count, criteria.rate())
            thread.join()
        finally:
            if thread.is_alive():  # the consumer went away: stop the worker so the lock frees soon
                cancel.set()
        if "error" in result:
            raise ChatError(f"generation with {name!r} failed: {result['error']}") from result["error"]
        yield StreamUpdate(text, criteria.count, criteria.rate(), done=True, cancelled=cancel.is_set(),
                           trace=result.get("trace"))

    def _generate(self, name, input_ids, attention_mask, settings, streamer, criteria, result) -> None:
        """Worker thread: take the lock, switch adapter, generate with routing hooks, release."""
        try:
            with self._lock:
                if criteria.cancel.is_set():  # stopped while waiting for the lock
                    streamer.end()
                    return
                self._activate(name)
                recorder = RouterRecorder(self.model, last_token_only=True)
                criteria.start = criteria.last = time.perf_counter()
                chat = self._chat_template(name)  # stop on the end-of-turn token it was trained to emit
                stop = {"eos_token_id": stop_token_ids(self.tokenizer, chat)} if chat is not None else {}
                try:
                    output = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([criteria]),
                        pad_token_id=self._pad_token_id(), **stop,
                        **settings.generate_kwargs(),
                    )  # (1, S + new)
                finally:
                    recorder.remove()
                new_ids = output[0, input_ids.shape[-1]:].tolist()
                criteria.count = len(new_ids)
                tokens = [self.tokenizer.decode([t]) for t in new_ids]
                block = self.adapters.get(name)
                result["trace"] = routing_trace(
                    recorder, new_ids, tokens, num_base_experts=self.arch.num_experts(self.model.config),
                    num_peft_experts=_peft_expert_count(self.model) if block else 0,
                    variant=block.variant if block else None,
                )
        except Exception as err:  # noqa: BLE001  reported to the consumer, which raises ChatError
            result["error"] = err
            streamer.end()

    def _pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def respond(self, name: str, history: list[dict], message: str, settings: GenerationSettings,
                style: str = "template", cancel: threading.Event | None = None,
                context: str = "") -> Iterator[tuple[list[dict], StreamUpdate]]:
        """Stream ``(history with the growing reply, update)`` for one column's chat turn."""
        if not message.strip():
            raise ChatError("the prompt is empty; type a message first")
        prompt = self.build_prompt(history, message, style, context, name)
        turn = [*history, {"role": "user", "content": user_content(message, context)}]
        plain = style == "template" and self._chat_template(name) is None  # a chat template writes its own tokens
        for update in self.stream(name, prompt, settings, cancel, add_special_tokens=plain):
            yield [*turn, {"role": "assistant", "content": update.text}], update


def _peft_expert_count(model) -> int:
    return next((b.perft_experts.num_experts for _, b in iter_perft_blocks(model)), 0)

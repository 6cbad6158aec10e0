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

import dataclasses
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..errors import PerftQloraError
from ..formats.prompts import DEFAULT_TEMPLATE, get_template
from ..method.adapters import adapter_kind, attach_saved_adapter, detach_adapter, recorded_training, training_record
from ..method.checkpoint import (
    AdapterError,
    adapter_parameters,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    read_config_json,
)
from ..method.config import PerftConfig
from ..method.layer import PerftMoEBlock
from ..method.model import ParameterReport, attach_perft, iter_perft_blocks, parameter_report
from ..quant.arch import decoder_layers, get_arch
from ..quant.loader import load_model

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
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": float(self.temperature),
                "top_p": float(self.top_p)}


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


@dataclass
class _Adapter:
    directory: str
    config: PerftConfig | None
    """None for a peft adapter (the LoRA baseline), which is re-read from ``directory`` when activated."""
    state: dict[str, torch.Tensor] | None
    metadata: dict
    report: object

    @property
    def variant(self) -> str:
        return self.config.variant if self.config is not None else f"peft {self.metadata.get('peft_type', '?').lower()}"

    @property
    def template(self) -> str:
        """The prompt template the adapter was trained with (recorded by training), else the default."""
        return recorded_training(self.metadata).get("template") or DEFAULT_TEMPLATE

    @property
    def knobs(self) -> dict:
        if self.config is not None:
            return self.config.to_dict()
        return {k: self.metadata.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}


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


class RoutingRecorder:
    """Forward hooks on every layer's base router and PERFT router (instance modules), removed by ``remove``.

    Each model forward calls each router once; the last row of its output is the position whose logits
    pick the next token, so forward step ``j`` gives generated token ``j``'s routing (batch size 1).
    """

    def __init__(self, model):
        arch = get_arch(model.config)
        self.base: dict[int, list[Expert]] = {}
        self.peft: dict[int, list[Expert]] = {}
        self.handles = []
        for i, layer in enumerate(decoder_layers(model)):
            block = getattr(layer, arch.moe_block)
            if not arch.is_moe_block(block):  # dense MLP layers (DeepSeek's first ones) route nothing
                continue
            if isinstance(block, PerftMoEBlock):
                self._hook(self.base, i, getattr(block.base, arch.router), lambda out: (out[1], out[2]))
                self._hook(self.peft, i, block.perft_router, lambda out: (out.weights, out.indices))
            else:
                self._hook(self.base, i, getattr(block, arch.router), lambda out: (out[1], out[2]))

    def _hook(self, store: dict, layer: int, module, unpack) -> None:
        store[layer] = []

        def record(_module, _args, output):
            weights, indices = unpack(output)  # (T, K), (T, K)
            w, idx = weights[-1].detach().float().cpu().tolist(), indices[-1].detach().cpu().tolist()
            store[layer].append(sorted(zip(idx, w), key=lambda e: -e[1]))

        self.handles.append(module.register_forward_hook(record))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def trace(self, token_ids: list[int], tokens: list[str], **facts) -> RoutingTrace:
        n = len(token_ids)
        return RoutingTrace(
            tokens=tokens, token_ids=token_ids, base={i: steps[:n] for i, steps in self.base.items()},
            peft={i: steps[:n] for i, steps in self.peft.items()}, **facts,
        )


def message_text(message: dict) -> str:
    """Text of an OpenAI-style message whose content is a string or a list of ``{"type": "text"}`` parts."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def user_content(message: str, context: str = "") -> str:
    """How a turn with an optional input/context reads in a chat history."""
    return f"{message}\n\n{context}" if context and context.strip() else message


class ChatModel:
    """A frozen base model, its tokenizer, and named adapters served one request at a time."""

    def __init__(self, model, tokenizer, name: str = "base model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        if getattr(model, "perft_config", None) is not None:
            raise ChatError("pass the base model without an adapter attached; register adapters by name instead")
        self.arch = get_arch(model.config)
        self.adapters: dict[str, _Adapter] = {}
        self.active = BASE
        self._lock = threading.Lock()
        self._base_report = parameter_report(model)
        self._cancels: weakref.WeakValueDictionary[str, threading.Event] = weakref.WeakValueDictionary()

    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, quantize: str = "nf4") -> ChatModel:
        """Load the base model once (NF4 by default)."""
        model, tokenizer = load_model(name_or_path, quantize=quantize, device=device, progress=True)
        return cls(model, tokenizer, name=name_or_path)

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
            self._detach()
            try:
                entry = self._peft_entry(directory) if adapter_kind(directory) == "peft" else self._perft_entry(directory)
            except OSError as err:
                raise AdapterError(f"cannot read adapter {directory}: {err}") from err
            finally:
                self._detach()
        self.adapters[name] = entry

    def _perft_entry(self, directory: str) -> _Adapter:
        """Load a PERFT adapter once and keep a copy of its tensors; call with the lock held."""
        metadata = read_adapter_config(directory)
        load_adapter(self.model, directory)
        state = {k: v.clone() for k, v in adapter_state_dict(self.model).items()}
        return _Adapter(directory, dataclasses.replace(self.model.perft_config), state, metadata,
                        parameter_report(self.model))

    def _peft_entry(self, directory: str) -> _Adapter:
        """Check a peft adapter fits the base (attach, count its LoRA values, detach); call with the lock held."""
        adapted = attach_saved_adapter(self.model, directory)
        try:
            values = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
        finally:
            self.model = detach_adapter(adapted)
        base = self._base_report
        report = ParameterReport(values, values, base.backbone, base.backbone_per_token)  # LoRA is dense per token
        metadata = {**read_config_json(directory), "extra": {"training": training_record(directory)}}
        return _Adapter(directory, None, None, metadata, report)

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
            r = self._base_report
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

    def _adapter(self, name: str) -> _Adapter:
        if name not in self.adapters:
            raise ChatError(f"unknown adapter {name!r}; registered: {', '.join(self.names)}")
        return self.adapters[name]

    def _detach(self) -> None:
        if getattr(self.model, "perft_config", None) is not None or hasattr(self.model, "peft_config"):
            self.model = detach_adapter(self.model)
        self.active = BASE

    def _activate(self, name: str) -> None:
        """Put adapter ``name`` (or the bare base) on the model; call with the lock held."""
        if name == self.active:
            return
        entry = self._adapter(name) if name != BASE else None
        self._detach()
        if entry is not None and entry.config is None:  # peft: re-read its (small) files
            self.model = attach_saved_adapter(self.model, entry.directory)
            self.active = name
        elif entry is not None:
            dtype = next(iter(entry.state.values())).dtype  # as load_adapter attached it (bf16 or fp32 masters)
            attach_perft(self.model, entry.config, dtype=dtype)
            with torch.no_grad():
                for key, param in adapter_parameters(self.model).items():
                    param.copy_(entry.state[key])
            self.active = name

    # -- prompts --------------------------------------------------------------------------------------
    def build_prompt(self, history: list[dict], message: str, style: str = "template", context: str = "",
                     name: str | None = None) -> str:
        """The model input for ``message`` (and its optional ``context``) after ``history`` (OpenAI-style messages).

        ``template``: the LLM-Adapters template, ``message`` as the instruction and ``context`` as its input,
        without the history (adapters are trained single-turn); ``chat``: the tokenizer's chat template over the
        whole conversation, ``context`` appended to the message.
        """
        if style == "template":  # the template adapter ``name`` was trained with (the base: the default)
            entry = self.adapters.get(name) if name is not None else None
            return get_template(entry.template if entry is not None else DEFAULT_TEMPLATE).eval(message, context, "")
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
                recorder = RoutingRecorder(self.model)
                criteria.start = criteria.last = time.perf_counter()
                try:
                    output = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([criteria]),
                        pad_token_id=self._pad_token_id(),
                        **settings.generate_kwargs(),
                    )  # (1, S + new)
                finally:
                    recorder.remove()
                new_ids = output[0, input_ids.shape[-1]:].tolist()
                criteria.count = len(new_ids)
                tokens = [self.tokenizer.decode([t]) for t in new_ids]
                block = self.adapters.get(name)
                result["trace"] = recorder.trace(
                    new_ids, tokens, num_base_experts=self.arch.num_experts(self.model.config),
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
        for update in self.stream(name, prompt, settings, cancel, add_special_tokens=style == "template"):
            yield [*turn, {"role": "assistant", "content": update.text}], update


def _peft_expert_count(model) -> int:
    return next((b.perft_experts.num_experts for _, b in iter_perft_blocks(model)), 0)

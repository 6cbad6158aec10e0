"""ChatModel: adapters switched on one base, streaming, cancellation, routing capture, prompts, bad adapters."""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from perft_qlora import (
    PerftConfig,
    attach_perft,
    iter_perft_blocks,
    load_adapter,
    load_model,
    parameter_report,
    save_adapter,
)
from perft_qlora.formats.prompts import TEMPLATES, format_prompt
from perft_qlora.method.recorder import RouterRecorder
from perft_qlora.serving.chat import BASE, ChatError, ChatModel, GenerationSettings
from perft_qlora.training.tiny import save_tiny_model

ADAPTERS = {
    "perft": PerftConfig(variant="perft", num_experts=4, top_k=2, bottleneck=8),
    "perft_e": PerftConfig(variant="perft_e", bottleneck=8),
}
NUM_LAYERS, NUM_BASE_EXPERTS, BASE_TOP_K = 2, 8, 2  # tiny.py's OLMoE
GREEDY = GenerationSettings(max_new_tokens=10, greedy=True)


def make_adapter_dirs(root: str) -> tuple[str, dict[str, str]]:
    """A tiny OLMoE base and the ``ADAPTERS`` saved from it, with random ``up`` weights so outputs differ."""
    base = save_tiny_model(os.path.join(root, "base"), "olmoe", seed=0)
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model, _ = load_model(base, device="cpu", progress=False)
        attach_perft(model, config, dtype=torch.float32 if name == "perft_e" else None)  # fp32 masters too
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, block in iter_perft_blocks(model):
                up = block.perft_experts.up
                up.copy_((torch.randn(up.shape, generator=generator) * 0.5).to(up.dtype))
        dirs[name] = save_adapter(model, os.path.join(root, name), extra_metadata={"train_steps": 7 + seed})
    return base, dirs


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return make_adapter_dirs(str(tmp_path_factory.mktemp("chat")))


@pytest.fixture(scope="module")
def chat(adapter_dirs):
    base, dirs = adapter_dirs
    model, tokenizer = load_model(base, device="cpu", progress=False)
    chat = ChatModel(model, tokenizer, name=base)
    assert chat.register_many(dirs) == {}
    return chat


def _reply(chat, name, message="hello", settings=GREEDY, **kwargs):
    updates = [u for _, u in chat.respond(name, [], message, settings, **kwargs)]
    return updates


def _reference_reply(base_dir, adapter_dir, message, max_new_tokens):
    """What a freshly loaded model with ``load_adapter`` generates greedily."""
    model, tokenizer = load_model(base_dir, device="cpu", progress=False)
    if adapter_dir:
        load_adapter(model, adapter_dir)
    ids = tokenizer(TEMPLATES["released"].eval(message, "", ""), return_tensors="pt").input_ids  # the default
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[-1]:].tolist()


def test_each_column_matches_a_freshly_loaded_adapter(chat, adapter_dirs):
    base_dir, dirs = adapter_dirs
    model = chat.model
    replies = {}
    for name in [BASE, "perft", "perft_e", BASE, "perft"]:  # switch back and forth on the same base
        final = _reply(chat, name)[-1]
        assert chat.model is model
        replies.setdefault(name, final.text)
        assert final.text == replies[name], f"{name} changed after switching adapters"
    assert len(set(replies.values())) == 3, "the adapters should change the base model's reply"
    for name, directory in [(BASE, None), ("perft", dirs["perft"]), ("perft_e", dirs["perft_e"])]:
        expected = chat.tokenizer.decode(_reference_reply(base_dir, directory, "hello", 10), skip_special_tokens=True)
        assert replies[name] == expected


def test_lora_baseline_is_served_beside_perft_and_detaches_cleanly(adapter_dirs, tmp_path):
    from perft_qlora.method.adapters import attach_saved_adapter
    from perft_qlora.training.baseline import attach_lora_baseline

    base_dir, dirs = adapter_dirs
    model, tokenizer = load_model(base_dir, device="cpu", progress=False)
    lora = attach_lora_baseline(model, rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    lora.save_pretrained(str(tmp_path / "lora"))
    served, _ = load_model(base_dir, device="cpu", progress=False)
    chat = ChatModel(served, tokenizer, name=base_dir)
    assert chat.register_many({"lora": str(tmp_path / "lora"), "perft": dirs["perft"]}) == {}
    info = chat.info("lora")
    assert info["variant"] == "peft lora" and info["knobs"]["r"] == 4
    # rank 4 on q/o (64 -> 64) and k/v (64 -> 32: two KV heads of 16) in 2 layers; LoRA is dense, so all per token
    assert info["trainable_parameters"] == info["activated_parameters_per_token"] == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2)
    order = [(name, _reply(chat, name)[-1].text) for name in ("lora", BASE, "perft", "lora")]
    assert order[0][1] == order[3][1], "the LoRA column changed after switching through the others"
    replies = dict(order)
    fresh, _ = load_model(base_dir, device="cpu", progress=False)
    reference = attach_saved_adapter(fresh, str(tmp_path / "lora"))
    ids = tokenizer(TEMPLATES["released"].eval("hello", "", ""), return_tensors="pt").input_ids
    out = reference.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert replies["lora"] == tokenizer.decode(out[0, ids.shape[-1]:].tolist(), skip_special_tokens=True)
    assert replies[BASE] == tokenizer.decode(_reference_reply(base_dir, None, "hello", 10), skip_special_tokens=True)
    assert replies["lora"] != replies[BASE]
    _reply(chat, BASE)
    assert not hasattr(chat.model, "peft_config")  # switching away removes the LoRA layers again


def test_stream_grows_and_reports_speed(chat):
    updates = _reply(chat, "perft")
    assert len(updates) >= 3
    texts = [u.text for u in updates]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), "streamed text must only grow"
    final = updates[-1]
    assert final.done and not final.cancelled and not any(u.done for u in updates[:-1])
    assert 0 < final.num_tokens <= GREEDY.max_new_tokens
    assert final.tokens_per_s > 0
    assert "tokens/s" in final.summary()


def test_routing_trace_per_generated_token(chat):
    for name in (BASE, "perft", "perft_e"):
        trace = _reply(chat, name)[-1].trace
        n = len(trace.tokens)
        assert n == _reply(chat, name)[-1].num_tokens
        assert sorted(trace.base) == list(range(NUM_LAYERS))
        for steps in trace.base.values():
            assert len(steps) == n
            for experts in steps:
                assert len(experts) == BASE_TOP_K and all(0 <= e < NUM_BASE_EXPERTS for e, _ in experts)
                assert [w for _, w in experts] == sorted((w for _, w in experts), reverse=True)
        if name == BASE:
            assert trace.peft == {} and trace.variant is None
        elif name == "perft":
            assert trace.variant == "perft" and trace.num_peft_experts == 4
            for steps in trace.peft.values():
                assert all(len(x) == 2 and all(0 <= e < 4 for e, _ in x) for x in steps)
        else:  # PERFT-E follows the base router exactly
            assert trace.peft == trace.base and trace.num_peft_experts == NUM_BASE_EXPERTS


def test_routing_trace_matches_a_full_forward(chat):
    """Step j of the trace is the routing of the position that predicted generated token j."""
    final = _reply(chat, "perft")[-1]
    tokenizer = chat.tokenizer
    prompt_ids = tokenizer(TEMPLATES["released"].eval("hello", "", ""), return_tensors="pt").input_ids  # (1, S)
    new_ids = torch.tensor([final.trace.token_ids])  # (1, n)
    assert new_ids.shape[-1] == final.num_tokens == len(final.trace.tokens)
    ids = torch.cat([prompt_ids, new_ids], dim=-1)
    chat._activate("perft")
    recorded, handles = {}, []
    for i, block in iter_perft_blocks(chat.model):
        handles.append(block.perft_router.register_forward_hook(
            lambda _m, _a, out, i=i: recorded.__setitem__(i, out.indices)))  # (S + n, K')
    try:
        with torch.no_grad():
            chat.model(ids)
    finally:
        for h in handles:
            h.remove()
    positions = range(prompt_ids.shape[-1] - 1, ids.shape[-1] - 1)
    agree = [
        sorted(e for e, _ in steps[j]) == sorted(recorded[layer][pos].tolist())
        for layer, steps in final.trace.peft.items() for j, pos in enumerate(positions)
    ]
    assert len(agree) == NUM_LAYERS * final.num_tokens
    assert all(agree), f"only {sum(agree)}/{len(agree)} steps agree with a full forward"


def test_recorder_hooks_are_on_instances_and_removed(chat):
    chat._activate("perft")
    blocks = [b for _, b in iter_perft_blocks(chat.model)]
    recorder = RouterRecorder(chat.model)
    assert len(recorder.handles) == 2 * NUM_LAYERS
    assert all(len(b.perft_router._forward_hooks) == 1 and len(b.base.gate._forward_hooks) == 1 for b in blocks)
    recorder.remove()
    assert all(not b.perft_router._forward_hooks and not b.base.gate._forward_hooks for b in blocks)
    chat._activate(BASE)
    recorder = RouterRecorder(chat.model)
    assert len(recorder.handles) == NUM_LAYERS  # the base model: its routers only
    recorder.remove()


def test_cancel_stops_generation_and_frees_the_model(chat):
    long = GenerationSettings(max_new_tokens=400)
    cancel = chat.new_request("session-a")
    updates = []
    for _, update in chat.respond("perft", [], "hello", long, cancel=cancel):
        updates.append(update)
        if len(updates) == 2:
            assert chat.cancel("session-a")
    final = updates[-1]
    assert final.cancelled and final.done and final.num_tokens < 50
    assert "stopped" in final.summary()
    assert not chat.cancel("no-such-session")
    assert _reply(chat, BASE)[-1].num_tokens > 0  # the lock was released


def test_consumer_leaving_early_cancels_the_worker(chat):
    stream = chat.stream("perft", format_prompt("hi"), GenerationSettings(max_new_tokens=400))
    next(stream)
    stream.close()  # e.g. the browser tab closed
    done = threading.Event()
    threading.Thread(target=lambda: (_reply(chat, BASE), done.set()), daemon=True).start()
    assert done.wait(30), "the abandoned generation kept the model locked"


def test_concurrent_requests_are_serialized(chat):
    expected = {name: _reply(chat, name)[-1].text for name in ("perft", "perft_e", BASE)}
    results, errors = {}, []

    def run(name):
        try:
            results[name] = _reply(chat, name)[-1].text
        except Exception as err:  # noqa: BLE001  surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == expected


def test_generation_failure_is_reported_not_hung(chat, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(chat.model, "generate", broken)  # instance attribute, undone after the test
    with pytest.raises(ChatError, match="device lost"):
        _reply(chat, "perft")
    monkeypatch.undo()
    assert _reply(chat, "perft")[-1].num_tokens > 0


def test_prompt_styles(chat, monkeypatch):
    released = TEMPLATES["released"].eval
    assert chat.build_prompt([], "Say hi", "template") == released("Say hi", "", "")  # base: the default template
    assert chat.build_prompt([], "Say hi", "template", context="to Ann") == released("Say hi", "to Ann", "")
    assert chat.build_prompt([], "Say hi", "template", name="perft") == released("Say hi", "", "")  # none recorded
    monkeypatch.setitem(chat.adapters["perft"].metadata, "extra", {"training": {"template": "alpaca"}})
    assert chat.build_prompt([], "Say hi", "template", name="perft") == format_prompt("Say hi")  # the adapter's own
    with pytest.raises(ChatError, match="no chat template.*LLM-Adapters template"):
        chat.build_prompt([], "Say hi", "chat")
    with pytest.raises(ChatError, match="unknown prompt style"):
        chat.build_prompt([], "Say hi", "alpaca")
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "text", "text": "reply"}]},  # Gradio 6's content parts
    ]
    chat.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        prompt = chat.build_prompt(history, "second", "chat")
        assert prompt == "<user>first\n<assistant>reply\n<user>second\n<assistant>"
        assert chat.build_prompt([], "second", "chat", context="ctx") == "<user>second\n\nctx\n<assistant>"
        turn, update = list(chat.respond("perft", history, "second", GREEDY, style="chat"))[-1]
        assert update.num_tokens > 0 and [m["role"] for m in turn] == ["user", "assistant", "user", "assistant"]
    finally:
        chat.tokenizer.chat_template = None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max new tokens"),
        ({"greedy": False, "temperature": 0.0}, "temperature"),
        ({"greedy": False, "top_p": 1.5}, "top-p"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ChatError, match=message):
        GenerationSettings(**kwargs)


def test_empty_prompt_and_unknown_adapter(chat):
    with pytest.raises(ChatError, match="empty"):
        _reply(chat, "perft", message="   ")
    with pytest.raises(ChatError, match="unknown adapter 'nope'.*base, perft, perft_e"):
        _reply(chat, "nope")


def test_adapter_info(chat, adapter_dirs):
    info = chat.info("perft")
    model, _ = load_model(adapter_dirs[0], device="cpu", progress=False)
    load_adapter(model, adapter_dirs[1]["perft"])
    report = parameter_report(model)
    assert info["variant"] == "perft" and info["knobs"]["num_experts"] == 4 and info["knobs"]["top_k"] == 2
    assert info["trainable_parameters"] == report.trainable > 0
    assert info["activated_parameters_per_token"] == report.trainable_per_token
    assert info["adapter_config"]["extra"] == {"train_steps": 7}
    assert chat.info("perft_e")["adapter_config"]["extra"] == {"train_steps": 8}
    base = chat.info(BASE)
    assert base["backbone_parameters"] == report.backbone
    with pytest.raises(ChatError, match="unknown adapter"):
        chat.info("missing")


def test_bad_adapters_are_refused_and_the_model_keeps_working(chat, adapter_dirs, tmp_path, tiny_nf4):
    before = _reply(chat, "perft")[-1].text
    mixtral, _ = tiny_nf4("mixtral")
    attach_perft(mixtral, PerftConfig(variant="perft_s"))
    mismatched = save_adapter(mixtral, str(tmp_path / "mixtral"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    good_config = Path(adapter_dirs[1]["perft"]) / "perft_config.json"
    (corrupt / "perft_config.json").write_text(good_config.read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    errors = chat.register_many({
        "missing": str(tmp_path / "nowhere"), "mixtral": mismatched, "corrupt": str(corrupt), "lora": str(lora),
        "bad_json": str(bad_json), BASE: adapter_dirs[1]["perft"], "perft": adapter_dirs[1]["perft"],
    })
    assert "perft_config.json (PERFT) and adapter_config.json (peft) are missing" in errors["missing"]
    assert "model_type='mixtral'" in errors["mixtral"]
    assert "corrupt" in errors["corrupt"] and "corrupt" in errors["bad_json"]
    assert "peft adapter" in errors["lora"] and "does not fit this model" in errors["lora"]
    assert "reserved for the base model" in errors[BASE]
    assert "already registered" in errors["perft"]
    assert chat.names == [BASE, "perft", "perft_e"]
    assert getattr(chat.model, "perft_config", None) is None  # nothing half-attached
    assert _reply(chat, "perft")[-1].text == before
    assert json.loads(good_config.read_text())["perft"]["variant"] == "perft"  # the source was not touched


def test_a_model_with_an_adapter_attached_is_refused(tiny_nf4):
    model, tokenizer = tiny_nf4("olmoe")
    attach_perft(model, PerftConfig(variant="perft_s"))
    with pytest.raises(ChatError, match="without an adapter attached"):
        ChatModel(model, tokenizer)

"""apps/compare.py: its handlers called directly, its CLI, and its API through gradio_client on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from test_chat import adapter_dirs, chat  # noqa: F401  (module-scoped fixtures: tiny base + two adapters)

import perft_qlora.serving.chat as chat_module
from perft_qlora.formats.prompts import TEMPLATES
from perft_qlora.serving.chat import BASE, ChatModel, GenerationSettings, RoutingTrace, message_text

APP_PATH = Path(__file__).resolve().parents[1] / "apps" / "compare.py"
NAMES = [BASE, "perft", "perft_e"]
MAX_NEW = 8


def load_app():
    """Import apps/compare.py (a script, not a package module) under a private name."""
    spec = importlib.util.spec_from_file_location("compare_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_module():
    return load_app()


@pytest.fixture(scope="module")
def expected(chat):  # noqa: F811
    """Each column's greedy reply to "hello", straight from ChatModel."""
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    return {name: list(chat.respond(name, [], "hello", settings))[-1][1].text for name in NAMES}


def _send(app, message="hello", style="template", view=1, histories=None, max_new=MAX_NEW, context=""):
    histories = histories or [[] for _ in NAMES]
    return list(app.send(None, message, context, style, max_new, 0.7, 0.9, True, view, *NAMES, *histories))


def _unpack(outputs):
    """(prompt box, input box, histories, stats, traces, heat map, turn) from one yield of send/retry."""
    n = len(NAMES)
    rest = outputs[2:]
    return (outputs[0], outputs[1], rest[:n], rest[n:2 * n], rest[2 * n], rest[2 * n + 1], rest[2 * n + 2])


def test_import_loads_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(chat_module, "load_model", lambda *a, **k: calls.append(a))
    module = load_app()
    assert calls == [] and not any(isinstance(v, (ChatModel, gr.Blocks)) for v in vars(module).values())


def test_cli(app_module, tmp_path, capsys):
    args = app_module.make_parser().parse_args(["--model", "m", "--adapter", "a=dir/a", "--adapter", "b = dir/b"])
    assert args.host == "127.0.0.1" and args.adapter == ["a=dir/a", "b = dir/b"]
    for bad, message in (("=dir/a", "takes NAME=DIR or DIR"), ("base=dir/a", "'base' is used twice or is reserved")):
        with pytest.raises(SystemExit) as exit_info:  # read as evaluate and analyze read it, before any model loads
            app_module.main(["--model", str(tmp_path), "--adapter", bad])
        assert exit_info.value.code == 1 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app_module.main([])
    assert "give --model" in capsys.readouterr().err


def test_demo_outputs_are_built_when_missing_after_saying_so(app_module, tmp_path, capsys):
    built = []

    def build(directory):
        built.append(directory)
        os.makedirs(os.path.join(directory, "base"))
        os.makedirs(os.path.join(directory, "adapter"))

    target = str(tmp_path / "nowhere")
    base, adapters = app_module.demo_paths(target, build)
    assert built == [target] and base == os.path.join(target, "base") and adapters == {"demo": f"{target}/adapter"}
    assert f"python -m perft_qlora.train --demo --output-dir {target}" in capsys.readouterr().err
    app_module.demo_paths(target, build)  # present now: nothing is rebuilt, nothing is said
    assert built == [target] and capsys.readouterr().err == ""


def test_send_streams_into_every_column(app_module, chat, expected):  # noqa: F811
    app = app_module.CompareApp(chat, len(NAMES))
    outputs = _send(app)
    assert len(outputs) > len(NAMES) * 2, "each column should stream several updates"
    prompt, context, histories, stats, traces, heat, turn = _unpack(outputs[-1])
    assert prompt == context == "" and turn == ["hello", ""]
    for name, history, stat in zip(NAMES, histories, stats):
        assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello"
        assert history[1]["content"] == expected[name]
        assert stat.startswith(f"**{name}**") and "tokens/s" in stat
    assert [t[0] for t in traces] == NAMES
    perft_trace = traces[1][1]
    assert heat.count("class='rt-cell'") == 2 * 2 * len(perft_trace.tokens)  # 2 layers x (PEFT, base) rows
    assert "L0 PEFT" in heat and "L1 base" in heat
    assert app.heatmap(0, traces).count("class='rt-cell'") == 2 * len(traces[0][1].tokens)  # base: no PEFT rows


def test_retry_and_clear(app_module, chat, expected):  # noqa: F811
    app = app_module.CompareApp(chat, len(NAMES))
    *_, histories, _, _, _, turn = _unpack(_send(app)[-1])
    outputs = list(app.retry(None, turn, "template", MAX_NEW, 0.7, 0.9, True, 1, *NAMES, *histories))
    *_, retried, _, _, _, _ = _unpack(outputs[-1])
    assert [len(h) for h in retried] == [2, 2, 2]
    assert [message_text(h[1]) for h in retried] == [expected[n] for n in NAMES]
    with pytest.raises(gr.Error, match="nothing to retry"):
        list(app.retry(None, None, "template", MAX_NEW, 0.7, 0.9, True, 1, *NAMES, [], [], []))
    cleared = app.clear()
    assert cleared[:3] == [[], [], []] and cleared[3:6] == ["", "", ""]
    assert cleared[-2:] == [app_module.HEATMAP_EMPTY, None]


def test_input_context_goes_into_the_template_and_retry_keeps_it(app_module, chat):  # noqa: F811
    app = app_module.CompareApp(chat, len(NAMES))
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    direct = chat.stream("perft", TEMPLATES["released"].eval("Is it loud?", "QUIET WORDS", ""), settings)
    want = list(direct)[-1].text
    *_, histories, _, _, _, turn = _unpack(_send(app, "Is it loud?", context="QUIET WORDS")[-1])
    assert turn == ["Is it loud?", "QUIET WORDS"] and histories[1][0]["content"] == "Is it loud?\n\nQUIET WORDS"
    assert histories[1][1]["content"] == want
    outputs = list(app.retry(None, turn, "template", MAX_NEW, 0.7, 0.9, True, 1, *NAMES, *histories))
    *_, retried, _, _, _, _ = _unpack(outputs[-1])
    assert [len(h) for h in retried] == [2, 2, 2] and retried[1][1]["content"] == want


def test_second_turn_keeps_history(app_module, chat):  # noqa: F811
    app = app_module.CompareApp(chat, len(NAMES))
    *_, histories, _, _, _, _ = _unpack(_send(app)[-1])
    *_, histories, _, _, _, _ = _unpack(_send(app, "again", histories=histories)[-1])
    assert [len(h) for h in histories] == [4, 4, 4] and all(h[2]["content"] == "again" for h in histories)


def test_bad_requests_show_errors(app_module, chat):  # noqa: F811
    app = app_module.CompareApp(chat, len(NAMES))
    with pytest.raises(gr.Error, match="no chat template"):
        _send(app, style="chat")
    with pytest.raises(gr.Error, match="empty"):
        _send(app, message="  ")
    with pytest.raises(gr.Error, match="max new tokens"):
        _send(app, max_new=0)


def test_routing_html(app_module):
    trace = RoutingTrace(
        tokens=["<b>", " "], token_ids=[1, 2], base={0: [[(3, 0.7), (1, 0.3)], [(2, 0.9), (0, 0.1)]]},
        peft={0: [[(0, 1.0), (1, 1.0)], [(0, 1.0), (1, 1.0)]]}, num_base_experts=4, num_peft_experts=2,
        variant="perft_d",
    )
    page = app_module.routing_html("dense <adapter>", trace)
    assert "&lt;b&gt;" in page and "<b>dense &lt;adapter&gt;</b>" in page and "␣" in page
    assert page.count(">all</td>") == 2  # dense variants: every PEFT expert, no choice to colour
    assert "3 (0.70), 1 (0.30)" in page and page.count("class='rt-cell'") == 4
    assert app_module.routing_html("x", None) == app_module.HEATMAP_EMPTY


def test_info_and_add_adapter(app_module, adapter_dirs, tmp_path):  # noqa: F811
    base_dir, dirs = adapter_dirs
    from perft_qlora import load_model

    fresh = ChatModel(*load_model(base_dir, device="cpu", progress=False), name=base_dir)
    app = app_module.CompareApp(fresh, 2)
    status, *updates = app.add_adapter("broken", str(tmp_path))
    assert status.startswith("⚠️") and "adapter_config.json (peft) are missing" in status
    assert fresh.names == [BASE] and all(u["choices"] == [BASE] for u in updates)
    status, *updates = app.add_adapter("perft", dirs["perft"])
    assert status.startswith("✅") and fresh.names == [BASE, "perft"]
    assert len(updates) == 2 and all(u["choices"] == [BASE, "perft"] for u in updates)
    text, config = app.info("perft")
    assert "variant `perft`" in text and "trainable parameters" in text and config["perft"]["num_experts"] == 4
    text, _ = app.info(BASE)
    assert "base model" in text
    text, config = app.info("gone")
    assert text.startswith("⚠️") and config == {}


@pytest.fixture(scope="module")
def server(app_module, chat):  # noqa: F811
    demo = app_module.build_demo(chat, errors={"broken": "it was broken"})
    port = free_port()
    demo.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _api_send(client, message="hello", max_new=MAX_NEW, style="template"):
    """The /send endpoint; returns (prompt box, input box, 3 histories, 3 stats, heat map) (states stay server-side)."""
    return client.predict(message, "", style, max_new, 0.7, 0.9, True, 1, *NAMES, [], [], [], api_name="/send")


def test_api_send_info_and_errors(server, expected):
    client = Client(server, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/send", "/retry", "/stop", "/clear", "/adapter_info", "/add_adapter"} <= set(endpoints)
    prompt, context, *rest = _api_send(client)
    histories, stats, heat = rest[:3], rest[3:6], rest[6]
    assert prompt == context == ""
    assert [message_text(h[-1]) for h in histories] == [expected[n] for n in NAMES]
    assert all("tokens/s" in s for s in stats) and "rt-cell" in heat
    text, config = client.predict("perft_e", api_name="/adapter_info")
    assert "perft_e" in text and config["perft"]["variant"] == "perft_e"
    with pytest.raises(Exception, match="no chat template"):
        _api_send(client, style="chat")
    status, *_ = client.predict("bad", "/no/such/adapter", api_name="/add_adapter")
    assert "⚠️" in status and "adapter_config.json (peft) are missing" in status
    assert message_text(_api_send(client)[2][-1]) == expected[BASE]  # still serving
    retried = client.predict("template", MAX_NEW, 0.7, 0.9, True, 1, *NAMES, [], [], [], api_name="/retry")
    assert [message_text(h[-1]) for h in retried[2:5]] == [expected[n] for n in NAMES]


def test_api_concurrent_clients_are_queued(server, expected):
    results, errors = [], []

    def one():
        try:
            results.append(_api_send(Client(server, verbose=False)))
        except Exception as err:  # noqa: BLE001  surfaced below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 3
    for out in results:
        assert [message_text(h[-1]) for h in out[2:5]] == [expected[n] for n in NAMES]


def test_api_stop(server):
    client = Client(server, verbose=False)
    job = client.submit("hello", "", "template", 512, 0.7, 0.9, True, 1, *NAMES, [], [], [], api_name="/send")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "no streamed output within a minute"
    assert "stopping" in client.predict(api_name="/stop")
    stats = job.result(timeout=120)[5:8]
    assert "stopped" in stats[0] and all("stopped" in s for s in stats), stats
    assert int(stats[0].split("· ")[1].split()[0]) < 512

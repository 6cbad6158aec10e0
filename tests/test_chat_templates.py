"""``--chat-template``: named templates and files resolved per tokenizer, the end-of-turn token generation stops on,
the record in the adapter, and every loader (evaluate, Generator, the app's ChatModel) prompting through it."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.chat_template_utils import is_chat_template_prefix_preserving, is_chat_template_stop_token_trained

from perft_qlora.evaluation.generate import generate_batch
from perft_qlora.evaluation.protocol import PROTOCOLS
from perft_qlora.formats.chat_templates import (
    CHATML_END,
    ChatTemplate,
    ChatTemplateError,
    instruction_prompt,
    resolve_chat_template,
    stop_token_ids,
    tokenizer_chat_template,
)
from perft_qlora.formats.prompts import format_prompt
from perft_qlora.serving.generator import Generator
from perft_qlora.training.tiny import build_byte_tokenizer, tiny_config
from perft_qlora.training.train import main, run

TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]


@pytest.fixture(scope="module")
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def im_end_tokenizer():
    """The byte tokenizer plus ChatML's end-of-turn as a special token (id 260, inside a 261-token model)."""
    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [CHATML_END]})
    return tokenizer


@pytest.mark.parametrize("name", ["chatml", "alpaca"])
def test_named_templates_mask_every_assistant_turn_with_its_end_token(byte_tokenizer, name):
    chat = resolve_chat_template(name, byte_tokenizer)
    assert chat.end_of_turn == byte_tokenizer.eos_token  # no <|im_end|> in this vocabulary: nothing is added
    byte_tokenizer.chat_template = chat.source
    out = byte_tokenizer.apply_chat_template(TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = byte_tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == f"yes{chat.end_of_turn}no{chat.end_of_turn}"  # both turns, each with the token that stops it
    assert is_chat_template_stop_token_trained(byte_tokenizer) and is_chat_template_prefix_preserving(byte_tokenizer)
    byte_tokenizer.chat_template = None


def test_chatml_ends_turns_with_im_end_when_the_tokenizer_has_it(im_end_tokenizer):
    chat = resolve_chat_template("chatml", im_end_tokenizer)
    assert chat.end_of_turn == CHATML_END
    assert stop_token_ids(im_end_tokenizer, chat) == [260, im_end_tokenizer.eos_token_id]
    prompt = instruction_prompt(im_end_tokenizer, chat, "Name it.", "a cat")
    assert prompt == "<|im_start|>user\nName it.\n\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert ChatTemplate.from_record({"chat_template": chat.to_record()}) == chat


def test_alpaca_chat_prompt_is_the_alpaca_text(byte_tokenizer):
    chat = resolve_chat_template("alpaca", byte_tokenizer)
    assert instruction_prompt(byte_tokenizer, chat, "Say hi.") == format_prompt("Say hi.")


def test_a_jinja_file_is_used_and_bad_ones_refused(byte_tokenizer, tmp_path):
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    chat = resolve_chat_template(str(good), byte_tokenizer)
    assert chat.name == str(good) and chat.end_of_turn == byte_tokenizer.eos_token
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    plain_end = tmp_path / "plain.jinja"
    plain_end.write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    for spec, message in [(str(tmp_path / "missing.jinja"), "no such file"), (str(broken), "does not render"),
                          (str(plain_end), "not with a special token"), ("chatmll", "no such file or named template")]:
        with pytest.raises(ChatTemplateError, match=message):
            resolve_chat_template(spec, byte_tokenizer)


def test_the_tokenizers_own_template_is_recorded_the_same_way(im_end_tokenizer):
    with pytest.raises(ChatTemplateError, match="no chat template; pass --chat-template"):
        tokenizer_chat_template(im_end_tokenizer)
    im_end_tokenizer.chat_template = resolve_chat_template("chatml", im_end_tokenizer).source
    own = tokenizer_chat_template(im_end_tokenizer)
    assert own.name == "tokenizer" and own.end_of_turn == CHATML_END
    im_end_tokenizer.chat_template = None


def test_train_refuses_a_missing_template_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--demo", "--output-dir", str(tmp_path / "out"), "--chat-template", str(tmp_path / "nope.jinja")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("error: --chat-template") and "no such file" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


class _Recording:
    """A model that records the keyword arguments of ``generate`` and passes the call on."""

    def __init__(self, model):
        self.model, self.calls = model, []

    @property
    def device(self):
        return self.model.device

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return self.model.generate(**kwargs)


@pytest.fixture(scope="module")
def ends_every_turn(im_end_tokenizer):
    """A tiny model that always predicts <|im_end|> (its LM head replaced by a bias on that token)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("olmoe", vocab_size=261)).eval()
    head = torch.nn.Linear(model.config.hidden_size, 261, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[260] = 10.0
    model.lm_head = head
    return model


def test_generation_stops_at_the_turn_end_not_at_max_new_tokens(ends_every_turn, im_end_tokenizer):
    chat = resolve_chat_template("chatml", im_end_tokenizer)
    generator = Generator(_Recording(ends_every_turn), im_end_tokenizer, chat=chat)
    assert generator("Say yes.", max_new_tokens=12) == ""  # the end-of-turn token is special: nothing shown
    call = generator.model.calls[0]
    assert call["eos_token_id"] == [260, im_end_tokenizer.eos_token_id]
    prompt_length = call["input_ids"].shape[1]
    assert len(ends_every_turn.generate(**{k: call[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=12,
                                        eos_token_id=call["eos_token_id"], pad_token_id=257)[0]) == prompt_length + 1
    # Without the template's stop token the same model runs to max_new_tokens: the wiring is what stops it.
    assert len(ends_every_turn.generate(**{k: call[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=12,
                                        pad_token_id=257)[0]) == prompt_length + 12
    protocol = PROTOCOLS["perft"].with_beams(1).with_chat(chat, im_end_tokenizer)
    recording = _Recording(ends_every_turn)
    prompt = protocol.prompt("math", {"instruction": "Say yes.", "input": ""})
    assert generate_batch(recording, im_end_tokenizer, [prompt], 12, 1, **protocol.generate_options()) == [""]
    assert recording.calls[0]["eos_token_id"] == [260, im_end_tokenizer.eos_token_id]
    assert recording.calls[0]["input_ids"].shape[1] == prompt_length  # no special token added to the prompt


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """Two steps of the demo trained through the ChatML template (its turns end with the demo base's EOS)."""
    out = tmp_path_factory.mktemp("chat")
    from perft_qlora.training.train_options import parse_args

    trainer = run(parse_args(["--demo", "--output-dir", str(out), "--max-steps", "2", "--val-size", "0",
                              "--batch-size", "4", "--save-steps", "100", "--warmup-steps", "0",
                              "--chat-template", "chatml"]))
    return out, trainer


def test_training_renders_rows_through_the_template_and_records_it(chat_run):
    out, trainer = chat_run
    assert trainer.processing_class.chat_template.startswith("{%- set eot = \"<|endoftext|>\" -%}")
    first = trainer.train_dataset[0]
    text = trainer.processing_class.decode(first["input_ids"])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|endoftext|>\n")
    with open(os.path.join(out, "adapter", "perft_config.json")) as handle:
        record = json.load(handle)["extra"]["training"]["chat_template"]
    assert record["name"] == "chatml" and record["end_of_turn"] == "<|endoftext|>"
    assert record["source"] == trainer.processing_class.chat_template


def test_evaluate_and_the_app_prompt_an_adapter_through_its_chat_template(chat_run, tmp_path):
    from perft_qlora.evaluation.evaluate import main as evaluate
    from perft_qlora.serving.chat import ChatModel

    out, _ = chat_run
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Is it lower case? Answer format: true/false", "input": t,
                                        "answer": a}) + "\n" for t, a in [("abc", "true"), ("ABC", "false")]))
    summary = evaluate(["--model", str(out / "base"), "--adapter", f"chat={out / 'adapter'}", "--no-base",
                        "--data", str(data), "--match", "contains", "--greedy", "--max-new-tokens", "8",
                        "--output-dir", str(tmp_path / "eval")])
    assert summary["decoding"]["template"]["chat"] == "chat:chatml" and summary["results"]["chat"]["mine"]["total"] == 2
    with open(tmp_path / "eval" / "predictions.jsonl") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle]
    assert prompts[0] == "<|im_start|>user\nIs it lower case? Answer format: true/false\n\nabc<|endoftext|>\n" \
                         "<|im_start|>assistant\n"
    app = ChatModel.load(str(out / "base"), device="cpu")
    app.register_adapter("chat", str(out / "adapter"))
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "true"}]
    assert app.build_prompt(history, "Again", name="chat") == (
        "<|im_start|>user\nHi<|endoftext|>\n<|im_start|>assistant\ntrue<|endoftext|>\n"
        "<|im_start|>user\nAgain<|endoftext|>\n<|im_start|>assistant\n")
    assert app.build_prompt([], "Hi", name="base").startswith("Below is an instruction")  # the base: unchanged
    generator = Generator.load(str(out / "base"), adapter=str(out / "adapter"), device="cpu")
    assert generator.chat.name == "chatml" and generator.prompt("Hi") == "<|im_start|>user\nHi<|endoftext|>\n" \
                                                                          "<|im_start|>assistant\n"
    with pytest.warns(UserWarning, match="trained with the chat template 'chatml'"):
        assert Generator.load(str(out / "base"), adapter=str(out / "adapter"), template="alpaca", device="cpu").chat is None

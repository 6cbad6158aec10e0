"""The non-weight files of an exported folder: ``config.json`` (``auto_map``, ``perft``), the modeling file,
the tokenizer with the adapter's prompt template as its chat template, and the model card.

The chat template renders the last user message as the instruction of the adapter's evaluation template
(``formats/prompts.py``, response slot empty), so ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True, tokenize=False)`` gives the prompt the adapter was trained to answer.
"""

from __future__ import annotations

import json
import os
import shutil

from ..formats.prompts import DEFAULT_TEMPLATE, get_template
from ..method.checkpoint import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, config_path

MODELING_NAME = "modeling_perft.py"
MODELING_TEMPLATE = os.path.join(os.path.dirname(__file__), MODELING_NAME)
ADAPTER_SUBDIR = "adapter"
"""The adapter's own files inside the folder, for ``perft_qlora.load_adapter`` after ``perft_qlora.load_model``."""
_SLOT = "\x00INSTRUCTION\x00"


def copy_modeling_file(directory: str) -> None:
    """The modeling file, byte for byte as the package keeps it (it imports only torch and transformers)."""
    shutil.copyfile(MODELING_TEMPLATE, os.path.join(directory, MODELING_NAME))


def copy_adapter(adapter_dir: str, target: str) -> None:
    """The adapter's own files, so that ``load_model(OUT)`` + ``load_adapter(model, OUT/adapter)`` round-trips."""
    os.makedirs(target)
    shutil.copyfile(config_path(adapter_dir), os.path.join(target, CONFIG_NAME))  # an older name is read as well
    for name in (WEIGHTS_NAME, CARD_NAME):
        if os.path.isfile(os.path.join(adapter_dir, name)):
            shutil.copyfile(os.path.join(adapter_dir, name), os.path.join(target, name))


def auto_map(model_type: str) -> dict[str, str]:
    """``config.json``'s ``auto_map`` for a family: the config and model classes of the modeling file."""
    from .modeling_perft import CLASSES

    config_class, model_class = CLASSES[model_type]
    module = MODELING_NAME.removesuffix(".py")
    return {"AutoConfig": f"{module}.{config_class}", "AutoModelForCausalLM": f"{module}.{model_class}"}


def write_perft_config(directory: str, perft: dict) -> None:
    """Add ``auto_map``, ``architectures`` and ``perft`` to the ``config.json`` that ``save_pretrained`` wrote;
    ``model_type`` stays the family's, so plain transformers (and ``perft_qlora.load_model``) still read it."""
    from .modeling_perft import CLASSES

    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["auto_map"] = auto_map(config["model_type"])
    config["architectures"] = [CLASSES[config["model_type"]][1]]
    config["perft"] = perft
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def chat_template(template: str | None) -> str:
    """A Jinja chat template rendering the last user message with the named prompt template."""
    text = get_template(template or DEFAULT_TEMPLATE).eval(_SLOT, "", "")
    before, after = text.split(_SLOT)
    literal = json.dumps  # a JSON string is a valid Jinja string literal
    return ("{%- set ns = namespace(text='') -%}{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
            "{%- set ns.text = message['content'] -%}{%- endif -%}{%- endfor -%}"
            f"{{{{ {literal(before)} }}}}{{{{ ns.text }}}}{{{{ {literal(after)} }}}}")


def save_tokenizer(tokenizer, directory: str, template: str | None) -> None:
    tokenizer.chat_template = chat_template(template)
    tokenizer.save_pretrained(directory)


def model_card(perft: dict | None, base: str, adapter: str, dtype: str, weights: str, template: str | None) -> str:
    """The exported folder's README.md: what it holds, how to load it, how to evaluate it."""
    variant = perft["variant"] if perft else "lora"
    remote = ", trust_remote_code=True" if perft else ""
    remote_arg = ",trust_remote_code=True" if perft else ""
    lines = [
        f"# {base} with the {variant} adapter {os.path.basename(os.path.normpath(adapter))}",
        "",
        "Exported by `python -m perft_qlora.export`; loads with plain transformers, without perft_qlora.",
        "",
        "| | |", "|---|---|",
        f"| base model | `{base}` |",
        f"| adapter | `{adapter}` ({variant}) |",
        f"| base weights | {weights} |",
        f"| dtype | {dtype} |",
        f"| prompt template | {template or DEFAULT_TEMPLATE} (the tokenizer's chat template) |",
    ]
    if perft:
        lines += [(f"| PERFT | M={perft['num_experts']}, K'={perft['top_k']}, bottleneck={perft['bottleneck']}, "
                   f"gating={perft['gating']}, layers={perft['layers']} |"),
                  "", (f"`{MODELING_NAME}` subclasses the family's transformers model and adds the PERFT router and "
                       "experts beside every adapted MoE block (it imports only torch and transformers).")]
    else:
        lines += ["", "The LoRA adapter is merged into the weights (peft `merge_and_unload`): a plain model."]
    lines += [
        "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER"{remote})',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'messages = [{"role": "user", "content": "Is the sky blue? Answer true or false."}]',
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
        "ids = tokenizer(prompt, return_tensors='pt')",
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=32)[0][ids.input_ids.shape[1]:]))",
        "```", "",
        (f"lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=THIS_FOLDER{remote_arg} "
         "--tasks boolq,piqa`."),
        "",
    ]
    return "\n".join(lines)

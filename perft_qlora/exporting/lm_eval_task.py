"""An lm-evaluation-harness task over LLM-Adapters rows with the paper's protocol: the adapter's prompt template,
greedy generation, the first label in the response scored by exact match.

``write_lm_eval_task(rows, directory, ...)`` writes ``<name>.jsonl`` (one ``prompt`` / ``answer`` per row, the
prompt rendered by ``evaluation/protocol.py`` exactly as ``python -m perft_qlora.evaluate --greedy`` renders
it) and ``<name>.yaml`` (``dataset_path: json``, ``generate_until``, a ``regex`` filter for the labels), so
``lm_eval --include_path DIRECTORY --tasks NAME --model hf --model_args pretrained=OUT,trust_remote_code=True``
scores an exported folder the way ``evaluate`` scores the adapter. Label and letter tasks only (BoolQ-like, the demo, AQuA):
math answers are read by ``evaluate`` as the last number after removing commas, which a regex filter does not do.
"""

from __future__ import annotations

import json
import os
import re

from ..evaluation.protocol import PROTOCOLS
from ..evaluation.tasks import TASKS
from ..formats.prompts import DEFAULT_TEMPLATE

YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["### Instruction:"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
filter_list:
  - name: extract
    filter:
      - function: regex
        regex_pattern: {pattern}
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lm_eval_task(rows: list[dict], directory: str, name: str = "perft_demo", task: str = "demo",
                       template: str | None = None) -> str:
    """Write the task's data and YAML into ``directory``; returns the YAML's path. ``task`` names the
    ``evaluation/tasks.py`` entry whose labels and decoding apply; ``template`` the prompt template
    (the adapter's recorded one; default ``released``)."""
    spec = TASKS[task]
    if spec.answer not in ("label", "letter"):
        raise ValueError(f"{task} is scored by its {spec.answer} rule; lm-eval tasks are written for label and "
                         "letter tasks only")
    protocol = PROTOCOLS["perft"].with_beams(1).with_template(template or DEFAULT_TEMPLATE)
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(os.path.abspath(directory), f"{name}.jsonl")
    with open(data + ".tmp", "w", encoding="utf-8") as handle:
        for row in rows:
            prompt = protocol.prompt(spec.family, row)
            handle.write(json.dumps({"prompt": prompt, "answer": row["answer"].strip()}) + "\n")
    os.replace(data + ".tmp", data)
    # evaluate's rule: the first label (or capital A-E) anywhere in the response
    labels = spec.labels if spec.answer == "label" else tuple("ABCDE")
    pattern = json.dumps("|".join(re.escape(label) for label in labels))
    text = YAML.format(name=name, data=json.dumps(data), pattern=pattern,
                       max_new_tokens=protocol.decoding(spec.family).max_new_tokens)
    path = os.path.join(directory, f"{name}.yaml")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path

"""The real task sets in the data folder (SST-2, AG News, GSM8K) as (input, label) items, with prompts and answer parsing.

Splits: SST-2 ``train`` (6,735) and ``test`` (the 872-sentence GLUE dev set); AG News has only a 10,000-row train
file, so its last 1,000 rows (a fixed, seeded shuffle) are held out as ``test`` and never trained on; GSM8K
``train``/``test`` as published. Prompts are chat messages so the same item works for the base model, a LoRA
specialist and an agent team.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass

from .data import data_path
from .errors import SlimswarmError

TASKS = ("sst2", "agnews", "gsm8k")
LABELS = {"sst2": ["negative", "positive"], "agnews": ["world", "sports", "business", "tech"]}
AGNEWS_NAMES = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "tech"}
AGNEWS_HELDOUT = 1000

SYSTEM = {
    "sst2": "You classify the sentiment of movie review snippets. Answer with one word: positive or negative.",
    "agnews": "You classify news articles by topic. Answer with one word: world, sports, business or tech.",
    "gsm8k": "You solve grade-school math word problems. Reason briefly, then give the final answer "
             "on its own line as '#### <number>'.",
}


@dataclass(frozen=True)
class TaskItem:
    task: str
    id: str
    input: str
    label: str  # the expected answer: a label word, or GSM8K's final number


def _check(task: str, split: str) -> None:
    if task not in TASKS:
        raise SlimswarmError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if split not in ("train", "test"):
        raise SlimswarmError(f"unknown split {split!r} for {task} (train, test)")


def load_task(task: str, split: str, n: int | None = None, seed: int = 0) -> list[TaskItem]:
    """Items of ``task``/``split``; ``n`` draws a seeded sample (all items when None)."""
    _check(task, split)
    items: list[TaskItem] = []
    if task == "sst2":
        with open(data_path(f"tasks/sst2/{split}.tsv"), encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
                items.append(TaskItem(task, f"sst2-{split}-{i}", row["sentence"].strip(),
                                      LABELS["sst2"][int(row["label"])]))
    elif task == "agnews":
        with open(data_path("tasks/agnews/train.tsv"), encoding="utf-8") as f:
            rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        rows = [r for r in rows if len(r) == 2 and r[1] in AGNEWS_NAMES]
        idx = list(range(len(rows)))
        random.Random(1234).shuffle(idx)  # fixed: the held-out rows never change with `seed`
        idx = idx[-AGNEWS_HELDOUT:] if split == "test" else idx[:-AGNEWS_HELDOUT]
        for i in idx:
            text = rows[i][0].replace(" #39;", "'").replace("#39;", "'").replace("\\", " ").strip()
            items.append(TaskItem(task, f"agnews-{i}", text, AGNEWS_NAMES[rows[i][1]]))
    else:
        with open(data_path(f"tasks/gsm8k/{split}.jsonl"), encoding="utf-8") as f:
            for i, line in enumerate(f):
                d = json.loads(line)
                items.append(TaskItem(task, f"gsm8k-{split}-{i}", d["question"], d["answer"].split("####")[-1].strip()
                                      .replace(",", "")))
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


def messages_for(item: TaskItem | str, task: str | None = None) -> list[dict[str, str]]:
    """Chat messages asking for ``item``'s answer."""
    if isinstance(item, TaskItem):
        task, text = item.task, item.input
    else:
        text = item
    if task not in SYSTEM:
        raise SlimswarmError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": text}]


def target_for(item: TaskItem, solution: str | None = None) -> str:
    """The completion a specialist is trained to produce (GSM8K: the worked solution when given)."""
    if item.task == "gsm8k" and solution:
        return solution.strip()
    return item.label if item.task != "gsm8k" else f"#### {item.label}"


def gsm8k_solutions(split: str = "train") -> dict[str, str]:
    """{item id: worked solution with the '<<...>>' calculator marks removed}."""
    out = {}
    with open(data_path(f"tasks/gsm8k/{split}.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            out[f"gsm8k-{split}-{i}"] = re.sub(r"<<[^>]*>>", "", json.loads(line)["answer"])
    return out


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(task: str, text: str) -> str | None:
    """The answer in a model's reply: the first label word mentioned, or the number after '####' (else the last)."""
    if task in LABELS:
        low = text.lower()
        synonyms = {"sci/tech": "tech", "science": "tech", "technology": "tech", "sport": "sports",
                    "negative": "negative", "positive": "positive", "world": "world", "business": "business"}
        best = None
        for word in list(LABELS[task]) + list(synonyms):
            m = re.search(r"\b" + re.escape(word) + r"\b", low)
            if m and (best is None or m.start() < best[0]):
                label = synonyms.get(word, word)
                if label in LABELS[task]:
                    best = (m.start(), label)
        return best[1] if best else None
    tail = text.split("####")[-1] if "####" in text else text
    nums = _NUM.findall(tail)
    if not nums:
        return None
    n = (nums[0] if "####" in text else nums[-1]).replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def is_correct(item: TaskItem, reply: str) -> bool:
    got = extract_answer(item.task, reply)
    if got is None:
        return False
    if item.task == "gsm8k":
        try:
            return abs(float(got) - float(item.label)) < 1e-6
        except ValueError:
            return False
    return got == item.label

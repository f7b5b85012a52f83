"""Writes small task files (JSONL {id, input, expected}) from the shared data: a seeded sample of SST-2 test,
AG News (its last 2,000 rows, held out from anything trained on the first part), GSM8K test, and a mix.

    python examples/tasks/make_tasks.py [--n 20]
"""

import argparse
import json
import random
from pathlib import Path

from slimswarm.data import data_path

HERE = Path(__file__).parent


def sst2(n, rng):
    rows = [line.split("\t") for line in data_path("tasks/sst2/test.tsv").read_text().splitlines()[1:]]
    pick = rng.sample(rows, n)
    return [{"id": f"sst2-{i}", "input": f"Is the sentiment of this review positive or negative?\n{s.strip()}",
             "expected": "positive" if lab.strip() == "1" else "negative"} for i, (s, lab) in enumerate(pick)]


def agnews(n, rng):
    rows = [line.rsplit("\t", 1) for line in data_path("tasks/agnews/train.tsv").read_text().splitlines()]
    pick = rng.sample(rows[-2000:], n)
    return [{"id": f"agnews-{i}", "input": f"Which topic is this news item: World, Sports, Business or Sci/Tech?\n"
                                           f"{t.strip()}", "expected": lab.strip()} for i, (t, lab) in enumerate(pick)]


def gsm8k(n, rng):
    rows = [json.loads(x) for x in data_path("tasks/gsm8k/test.jsonl").read_text().splitlines()]
    pick = rng.sample(rows, n)
    return [{"id": f"gsm8k-{i}", "input": r["question"],
             "expected": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")} for i, r in enumerate(pick)]


def write(name, rows):
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{HERE / name}: {len(rows)} tasks")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    n = min(ap.parse_args().n, 50)  # a sample, never the data set itself
    rng = random.Random(0)
    s, a, g = sst2(n, rng), agnews(n, rng), gsm8k(max(n // 2, 1), rng)
    write("sst2.jsonl", s)
    write("agnews.jsonl", a)
    write("gsm8k.jsonl", g)
    write("mixed.jsonl", s[:4] + a[:4] + g[:4])

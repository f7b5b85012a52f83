"""Scoring maps a data set's own label names to the answer labels (AG News "Sci/Tech" is answered by "tech")."""

import json
from pathlib import Path

from slimswarm.agents.answers import Extractor
from slimswarm.agents.config import build_team, parse_config
from slimswarm.agents.runner import backend_from_config, run_tasks

AGNEWS = ["world", "sports", "business", "tech"]


def test_dataset_label_names_count_as_the_answer_labels_they_mean():
    e = Extractor(AGNEWS)
    assert e.aliases == {"sci/tech": "tech"}
    assert e.correct("tech", "Sci/Tech") and e.correct("This one is Sci/Tech.", "Sci/Tech")
    assert e("It is about Sci/Tech") == "tech" and e.correct("Sci/Tech", "tech")
    assert not e.correct("sports", "Sci/Tech") and not e.correct("tech", "Sports")
    assert e.correct("Business.", "Business")
    assert Extractor(["positive", "negative"]).aliases == {}  # nothing to map for SST-2


def test_team_run_on_agnews_tasks_scores_tech_answers_right():
    rows = [json.loads(line) for line in Path("examples/tasks/agnews.jsonl").read_text().splitlines()]
    tasks = [{"id": r["id"], "input": r["input"], "expected": r["expected"]} for r in rows]
    n_tech = sum(r["expected"] == "Sci/Tech" for r in rows)
    assert 0 < n_tech < len(rows)
    cfg = parse_config({"name": "t", "answer": {"labels": AGNEWS}, "agents": [{"name": "a"}],
                        "teams": [{"name": "solo", "topology": "pipeline", "members": ["a"]}],
                        "script": [{"agent": "a", "reply": "The topic is tech."}]})
    report = run_tasks(build_team(cfg), tasks, backend_from_config(cfg, "scripted"))
    assert sum(t.correct for t in report.tasks) == n_tech
    assert report.accuracy == n_tech / len(rows)

"""Specialists: a trained adapter is cached by its spec, served by the engine through a team YAML, and the demo's
team-against-one-model comparison runs (stories260K and scripted backends: seconds)."""

import json
import os
from pathlib import Path

import pytest
import yaml

from slimswarm.agents.backends import ScriptedBackend
from slimswarm.agents.config import build_team, load_team_config, parse_config
from slimswarm.agents.runner import backend_from_config, run_tasks
from slimswarm.agents.specialists import (
    SpecialistSpec,
    baseline_config,
    cached,
    compare_runs,
    default_specs,
    demo_items,
    ensure_specialists,
    full_spec,
    lora_targets,
)
from slimswarm.errors import SlimswarmError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base="stories260k", examples=16, steps=3, batch_size=4, r=4, upper_layers=2, max_len=96)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    spec = SpecialistSpec("sentiment", **TINY)
    paths = ensure_specialists([spec], root, log=lambda s: None)
    return spec, paths[spec.name]


def test_training_writes_an_adapter_on_the_upper_layers_only(tiny_adapter):
    spec, path = tiny_adapter
    doc = json.loads((path / "adapter.json").read_text())
    assert doc["slimswarm"] == spec.key() and doc["train"]["examples"] == 16 and len(doc["train"]["history"]) >= 1
    assert set(doc["modules"]) and all(m.startswith(("model.layers.3.", "model.layers.4.")) for m in doc["modules"])
    assert lora_targets(5, None) == lora_targets(5, 9)  # every layer when the cut is not below the depth


def test_cached_adapter_is_reused_only_when_its_spec_matches(tiny_adapter, tmp_path):
    spec, path = tiny_adapter
    assert cached(path, spec)
    assert not cached(path, SpecialistSpec("sentiment", **{**TINY, "steps": 4}))
    assert not cached(tmp_path / "missing", spec)
    before = (path / "adapter.safetensors").stat().st_mtime_ns
    logs = []
    ensure_specialists([spec], path.parent, log=logs.append)
    assert (path / "adapter.safetensors").stat().st_mtime_ns == before and "reusing" in logs[0]
    with pytest.raises(SlimswarmError, match="specialist role"):
        SpecialistSpec("poetry")


def test_default_specs_cover_three_roles_and_the_math_one_trains_on_gsm8k_solutions(tmp_path):
    names = [s.name for s in default_specs()]
    assert names == ["sentiment-w4g128-rtn", "topic-w4g128-rtn", "sentiment", "topic", "math-w4g128-rtn"]
    assert all(s.steps == 30 for s in default_specs(quick=True)) and len(default_specs(quick=True)) == 4
    m = full_spec("math", quantize="w4g128-rtn")
    assert m.task == "gsm8k" and m.upper_layers == 10 and m.max_len >= 256
    with pytest.raises(SlimswarmError, match="specialist role 'poetry'"):
        full_spec("poetry")
    # the math specialist learns GSM8K's worked solutions, '<<...>>' calculator marks removed, ending in '#### n'
    from slimswarm.tasks import gsm8k_solutions, load_task, target_for

    item = load_task("gsm8k", "train", n=1, seed=3)[0]
    target = target_for(item, gsm8k_solutions()[item.id])
    assert target.endswith(f"#### {item.label}") and "<<" not in target
    spec = SpecialistSpec("math", **{**TINY, "max_len": 160})
    path = ensure_specialists([spec], tmp_path, log=lambda s: None)[spec.name]
    assert json.loads((path / "adapter.json").read_text())["train"]["task"] == "gsm8k"


def test_engine_serves_the_trained_adapter_through_a_team_yaml(tiny_adapter):
    _, path = tiny_adapter
    cfg = parse_config({
        "name": "t", "model": {"base": "stories260k", "max_len": 256, "adapters": {"sentiment": str(path)}},
        "answer": {"labels": ["positive", "negative"]},
        "agents": [{"name": "spec", "adapter": "sentiment", "params": {"max_tokens": 3}},
                   {"name": "plain", "params": {"max_tokens": 3}}],
        "teams": [{"name": "panel", "topology": "vote", "members": ["spec", "plain"]}]})
    backend = backend_from_config(cfg, "engine")
    try:
        items = demo_items(4)
        rep = run_tasks(build_team(cfg), [{"id": it.id, "input": it.input, "expected": it.label} for it in items],
                        backend, parallel=2)
        eng = backend.engines["default"]
        assert eng.adapters is not None and eng.adapters.names == ["sentiment"]
        assert all(t.status == "ok" for t in rep.tasks) and eng.stats()["finished"] == 8
    finally:
        backend.close()
        for e in backend.engines.values():
            e.stop()


def test_demo_team_against_one_model_with_a_scripted_backend():
    cfg = load_team_config(ROOT / "examples/teams/customer_service_lora.yaml")
    base = baseline_config(cfg)
    assert all(not m.adapters and m.compress is None for m in base.models.values())
    assert all(a.adapter is None for a in base.agents) and any(a.adapter for a in cfg.agents)
    items = demo_items(6)
    assert [it.task for it in items] == ["sst2", "agnews"] * 3
    scripted = ScriptedBackend([r.model_dump() for r in cfg.script])
    rows = compare_runs({"team": (build_team(cfg), scripted), "one model": (build_team(base), scripted)}, items)
    assert [r["name"] for r in rows] == ["team", "one model"]
    assert all(r["failed"] == 0 and 0 <= r["accuracy"] <= 1 and r["tokens"] > 0 for r in rows)
    routed = {agent for agent, _ in scripted.calls}
    assert routed == {"sentiment", "topic"}  # the rule router sends news to topic, reviews to sentiment


@pytest.mark.slow
def test_smollm2_short_sentiment_training_answers_with_labels_and_beats_the_base(tmp_path):
    """12 steps on SmolLM2 (about a minute on 2 free cores): the specialist names a label where the base rambles."""
    from slimswarm.agents.specialists import train_specialist
    from slimswarm.tasks import SYSTEM, extract_answer, load_task

    spec = SpecialistSpec("sentiment", steps=12, examples=96)
    train_specialist(spec, tmp_path / spec.name, log=lambda s: None)
    agent = {"system": SYSTEM["sst2"], "params": {"max_tokens": 3}}
    cfg = parse_config({"model": {"base": "smollm2-135m", "max_len": 256, "adapters": {"s": str(tmp_path / spec.name)}},
                        "agents": [{"name": "spec", "adapter": "s", **agent}, {"name": "base", **agent}],
                        "teams": [{"name": "t", "topology": "pipeline", "members": ["spec"]},
                                  {"name": "b", "topology": "pipeline", "members": ["base"]}]})
    backend = backend_from_config(cfg, "engine")
    try:
        items = load_task("sst2", "test", n=24, seed=1)
        teams = {n: build_team(cfg.model_copy(update={"main": n})) for n in ("t", "b")}
        spec_row, base_row = compare_runs({n: (t, backend) for n, t in teams.items()}, items)
        named = sum(extract_answer("sst2", a or "") is not None for a in spec_row["answers"])
        assert spec_row["failed"] == 0 and named >= 0.9 * len(items)
        assert spec_row["accuracy"] > base_row["accuracy"]
    finally:
        for e in backend.engines.values():
            e.stop()


def test_label_scoring_row_picks_a_label_of_each_items_task_and_matches_batch_scoring(stories):
    from slimswarm.agents.specialists import label_scoring_row
    from slimswarm.evaluate.choice import choice_accuracy
    from slimswarm.tasks import LABELS

    items = demo_items(4)
    row = label_scoring_row(stories.model, stories.tokenizer, items)
    assert [a in LABELS[it.task] for a, it in zip(row["answers"], items)] == [True] * 4
    assert row["failed"] == 0 and row["latency_p50_s"] > 0 and row["tokens"] == 0
    # one item at a time picks what scoring each task's items together picks
    for task in ("sst2", "agnews"):
        group = [it for it in items if it.task == task]
        picks = choice_accuracy(stories.model, stories.tokenizer, group)["picks"]
        assert picks == [a for a, it in zip(row["answers"], items) if it.task == task]
    assert row["correct"] == f"{sum(a == it.label for a, it in zip(row['answers'], items))}/4"

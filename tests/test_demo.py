"""The main job's orchestration (slimswarm.demo) on stories260k: a mixed-precision recipe's plan is printed and
kept in the report, with KL and top-1 agreement to the original."""

import json

from slimswarm.demo import DEFAULT_RECIPE, run_demo


def test_demo_prints_the_plan_and_reports_kl_and_top1(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSWARM_CACHE", str(tmp_path / "cache"))
    assert DEFAULT_RECIPE == "mixed-93mb"
    (tmp_path / "r.yaml").write_text(
        "quantize: {method: gptq, range_search: imatrix, budget_bpw: 5.0, formats: [w2g32, w4g32, w4, w6, w8],"
        " head_formats: [w4g32, w8]}\ncalibration: {samples: 8, seq_len: 128}\n")
    lines = []
    res = run_demo("stories260k", str(tmp_path / "r.yaml"), tmp_path / "out", max_tokens=1024, no_team=True,
                   log=lines.append)
    plan = [x for x in lines if x.strip().startswith("plan:")]
    assert len(plan) == 1 and "embeddings/LM head w" in plan[0] and "budget bytes" in plan[0], lines
    base, small = res["rows"]
    assert 0 < small["kl"] < 2 and 0.3 < small["top1_agreement"] < 1 and small["disk_bytes"] < base["disk_bytes"]
    doc = json.loads((tmp_path / "out/demo.json").read_text())
    assert doc["notes"] == [plan[0].strip()] and doc["rows"][1]["kl"] == small["kl"]
    assert isinstance(res["answer"], str)

"""`slimswarm plan` and device profiles on the command line: the table, the plan file with its team hash, the memory
plot; bad input (negative or missing memory, unknown variant, a plan from another team) in one line, exit 2."""

import yaml

from slimswarm.cli import main
from slimswarm.deploy.devices import load_devices
from slimswarm.deploy.planner import load_team
from slimswarm.deploy.plan_command import load_plan

from test_planner import table

DEV = {"devices": [{"name": "box", "memory_bytes": "1GB", "bandwidth_gb_s": 10, "cores": 2, "threads": 2}]}


def _files(tmp_path, devices=DEV, **agent):
    (tmp_path / "variants.yaml").write_text(yaml.safe_dump(table().model_dump(exclude_none=True)))
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump(devices))
    a = {"name": "sentiment", "base": "smollm2-135m", "p95_budget_s": 10, "task": "sst2", "min_accuracy": 0.6, **agent}
    (tmp_path / "team.yaml").write_text(yaml.safe_dump({"name": "desk", "variants": {"smollm2-135m": "variants.yaml"},
                                                        "agents": [a]}))
    return [str(tmp_path / "team.yaml"), "--devices", str(tmp_path / "devices.yaml"), "--out",
            str(tmp_path / "plan.yaml")]


def test_plan_prints_table_writes_plan_and_plot(tmp_path, capsys):
    assert main(["plan", *_files(tmp_path), "--objective", "bytes"]) == 0
    out = capsys.readouterr().out
    assert "| sentiment | w8 | box |" in out  # int4 misses the 0.6 floor (0.55); w8 is the smallest that meets it
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["agents"][0]["variant"] == "w8" and plan["devices"]["box"]["total_bytes"] <= 10**9
    assert (tmp_path / "plan.png").stat().st_size > 1000
    team, _ = load_team(tmp_path / "team.yaml")
    assert load_plan(tmp_path / "plan.yaml", team)["team"] == "desk"


def test_plan_from_another_team_is_refused(tmp_path, capsys):
    assert main(["plan", *_files(tmp_path)]) == 0
    plan = tmp_path / "plan.yaml"
    _files(tmp_path, p95_budget_s=20)  # the same team name, another budget: another hash
    team, _ = load_team(tmp_path / "team.yaml")
    import pytest

    from slimswarm.errors import SlimswarmError

    with pytest.raises(SlimswarmError, match=rf"^{plan}: field team_hash: the plan was made for team 'desk' "
                                             r"\(hash [0-9a-f]{16}\), not for team 'desk' \(hash [0-9a-f]{16}\)$"):
        load_plan(plan, team)


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_negative_or_missing_memory_is_one_line_naming_file_and_field(tmp_path, capsys):
    bad = {"devices": [{**DEV["devices"][0], "memory_bytes": -5}]}
    args = _files(tmp_path, devices=bad)
    assert main(["plan", *args]) == 2
    assert _err(capsys) == (f"slimswarm: error: {tmp_path / 'devices.yaml'}: field devices.0.memory_bytes: "
                            "Input should be greater than 0 (got -5)")
    missing = {"devices": [{k: v for k, v in DEV["devices"][0].items() if k != "memory_bytes"}]}
    _files(tmp_path, devices=missing)
    assert main(["plan", *args]) == 2
    assert _err(capsys) == f"slimswarm: error: {tmp_path / 'devices.yaml'}: field devices.0.memory_bytes: missing"
    assert not (tmp_path / "plan.yaml").exists()


def test_unknown_variant_is_one_line(tmp_path, capsys):
    args = _files(tmp_path, variants=["w2-magic"])
    assert main(["plan", *args]) == 2
    assert _err(capsys) == (f"slimswarm: error: {tmp_path / 'team.yaml'}: field agents.0.variants.0: unknown "
                            "variant 'w2-magic' of smollm2-135m (known: fp32, w8, w4g128-rtn)")


def test_infeasible_plan_writes_nothing(tmp_path, capsys):
    args = _files(tmp_path, min_accuracy=0.9)
    assert main(["plan", *args]) == 2
    assert _err(capsys) == ("slimswarm: error: agent sentiment: min_accuracy 0.9 on sst2: no variant reaches it; "
                            "the best, fp32, has 0.700 (short by 0.200)")
    assert not (tmp_path / "plan.yaml").exists() and not (tmp_path / "plan.png").exists()


def test_example_devices_load():
    ds = load_devices("examples/devices/edge_lab.yaml")
    assert [d.name for d in ds.devices] == ["rpi5-8gb", "jetson-orin-nano-8gb", "macbook-air-m2-16gb", "h200-node"]
    assert ds.by_name()["rpi5-8gb"].usable_bytes == 8 * 2**30 - 2**29
    assert ds.link("h200-node", "rpi5-8gb").latency_ms == 20.0


def test_bytes_by_format_sums_to_bytes_read_per_token(stories):
    import copy

    from slimswarm.compress import compress
    from slimswarm.deploy.costmodel import bytes_by_format
    from slimswarm.evaluate.size import decode_bytes_per_token

    m = copy.deepcopy(stories.model)
    assert bytes_by_format(m) == {"float32": decode_bytes_per_token(m)}
    compress(m, "w4g128-rtn")
    by = bytes_by_format(m)
    assert set(by) == {"int4", "int8", "float32"}  # int4 layers, the int8 embedding rows, float norms
    assert sum(by.values()) == decode_bytes_per_token(m)


def test_devices_probe_writes_a_profile_that_loads(tmp_path, capsys):
    out = tmp_path / "here.yaml"
    assert main(["devices", "probe", "--no-fit", "--name", "here", "--memory", "700MiB", "--threads", "1",
                 "--out", str(out)]) == 0
    (d,) = load_devices(out).devices
    assert d.name == "here" and d.memory_bytes == 700 * 2**20 and d.threads == 1 and d.bandwidth_gb_s > 0.1
    capsys.readouterr()
    assert main(["devices", "probe", "--memory=-1GB", "--out", str(tmp_path / "x.yaml")]) == 2
    assert _err(capsys) == "slimswarm: error: --memory must be a positive size, got '-1GB'"

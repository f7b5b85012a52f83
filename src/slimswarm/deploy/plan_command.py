"""deploy/: `slimswarm plan TEAM.yaml --devices D.yaml`: solve, print the placement table, write the plan file (with
the team's hash, so a plan made for another team is refused) and the per-device memory bar plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import SlimswarmError
from .devices import read_yaml, write_yaml_atomic
from .planner import Plan, TeamPlacement, load_team, solve, team_hash


def plan_rows(plan: Plan) -> list[dict]:
    return [{"agent": p.agent, "variant": p.variant, "device": "+".join(p.devices),
             "agent_MiB": round(p.memory_bytes / 2**20, 1), "device_MiB": round(sum(
                 sum(plan.device_bytes[d].values()) for d in p.devices) / 2**20, 1),
             "pred_p95_s": round(p.p95_s, 3), "budget_s": p.budget_s} for p in plan.placements]


def write_plan(plan: Plan, path: str | Path, command: str = "") -> Path:
    header = f"# Plan written by `{command}`\n" if command else ""
    return write_yaml_atomic(plan.as_dict(), path, header)


def load_plan(path: str | Path, team: TeamPlacement) -> dict:
    """A plan file, refused unless it was made for exactly this team (same hash of the team's placement section)."""
    d = read_yaml(path, "plan")
    if not isinstance(d, dict) or "team_hash" not in d:
        raise SlimswarmError(f"{path}: field team_hash: missing (not a slimswarm plan file)")
    want = team_hash(team)
    if d["team_hash"] != want:
        raise SlimswarmError(f"{path}: field team_hash: the plan was made for team {d.get('team')!r} "
                             f"(hash {d['team_hash']}), not for team {team.name!r} (hash {want})")
    return d


def run_plan(args) -> int:
    from ..evaluate.report import markdown_table
    from .devices import load_devices
    from .report import memory_bar_plot

    if not args.team:
        raise SlimswarmError("plan: give TEAM.yaml (or --measure to fill the variants table)")
    if not args.devices:
        raise SlimswarmError("plan: give --devices DEVICES.yaml")
    team, tables = load_team(args.team)
    devices = load_devices(args.devices)
    plan = solve(team, tables, devices, args.objective)  # Infeasible is a SlimswarmError: no file is written
    out = write_plan(plan, args.out, "slimswarm " + " ".join(sys.argv[1:]))
    png = Path(args.png) if args.png else Path(args.out).with_suffix(".png")
    memory_bar_plot(plan.device_bytes, plan.capacity, png, f"{team.name}: memory per device ({args.objective})")
    if args.json:
        print(json.dumps(plan.as_dict()))
    else:
        print(markdown_table(plan_rows(plan)))
        print(f"objective {args.objective}: worst p95/budget {plan.worst_ratio:.3f}; devices used "
              f"{len(plan.device_bytes)}; plan {out}; memory plot {png}")
    return 0

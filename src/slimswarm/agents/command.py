"""The ``slimswarm team`` subcommands (run, replay): parse, call the agents library, print the report."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SlimswarmError


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def _table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def print_report(report, as_json: bool = False) -> None:
    s = report.summary()
    if as_json:
        print(json.dumps({"summary": s, "agents": report.agents}, default=str))
        return
    print(_table([s]))
    print()
    print(_table([{"agent": k, **v} for k, v in report.agents.items()]))


def cmd_team_run(args) -> int:
    from .config import build_team, load_team_config
    from .runner import backend_from_config, read_tasks, run_tasks
    from .trace import Tracer, timeline_png

    cfg = load_team_config(args.team)
    kind, url = args.backend, args.url
    if kind.startswith(("http://", "https://")):  # `--backend http://host:port` shorthand
        kind, url = "http", kind
    if args.max_tasks is not None and args.max_tasks < 1:
        raise SlimswarmError(f"--max-tasks must be >= 1, got {args.max_tasks}")
    if args.parallel < 1:
        raise SlimswarmError(f"--parallel must be >= 1, got {args.parallel}")
    tasks = read_tasks(args.tasks, args.max_tasks)
    team = build_team(cfg)
    if getattr(args, "ray", None) is not None:  # the Ray backend comes from deploy/, injected by add_team_parser
        kind = "ray"
        backend = args.ray_backend(cfg, args.ray, args.timeout, team.agents())
    else:
        backend = backend_from_config(cfg, kind, url, args.timeout)
    tracer = Tracer(args.trace)
    budget = args.budget or cfg.budget_tokens

    def progress(r):
        if not args.json:
            mark = {"ok": "ok" if r.correct is not False else "wrong"}.get(r.status, r.status)
            print(f"  task {r.id}: {mark}  answer={r.answer!r} expected={r.expected!r}"
                  + (f"  ({r.error})" if r.error else ""), flush=True)

    try:
        report = run_tasks(team, tasks, backend, tracer, budget, args.parallel,
                           header={"team_config": cfg.model_dump(by_alias=True, exclude_none=True),
                                   "team_file": str(args.team)}, on_result=progress)
        if kind == "engine":
            from ..evaluate.size import weight_bytes

            from .backends import RoutedBackend

            eng = (backend.default if isinstance(backend, RoutedBackend) else backend).engines
            st = {k: e.stats() for k, e in eng.items()}
            report.extra["weight_bytes"] = sum(weight_bytes(e.model) for e in eng.values())
            report.extra["mean_decode_batch"] = round(sum(s["decode_rows"] for s in st.values()) /
                                                      max(1, sum(s["steps"] for s in st.values())), 2)
        elif hasattr(backend, "report_extra"):  # e.g. the Ray backend: calls per replica, retries
            report.extra.update(backend.report_extra())
    finally:
        tracer.close()
        backend.close()
    print_report(report, args.json)
    if args.trace:
        png = timeline_png(tracer.calls(), Path(args.trace).with_suffix(".png"), f"{cfg.name}: agent calls")
        if not args.json:
            print(f"\ntrace: {args.trace}  timeline: {png}")
    return 0


def cmd_team_replay(args) -> int:
    from .runner import replay

    report, diffs = replay(args.trace)
    print_report(report, args.json)
    if diffs:
        for d in diffs:
            print(f"mismatch: {d}")
        raise SlimswarmError(f"replay of {args.trace}: {len(diffs)} mismatch(es) with the recorded run")
    if not args.json:
        print(f"\nreplay of {args.trace}: all {len(report.tasks)} task outputs equal the recorded ones")
    return 0


def add_team_parser(sub, ray_backend=None) -> None:
    """Registers ``slimswarm team run|replay`` on the main parser's subcommands. ``ray_backend(cfg, address,
    timeout_s, agents) -> Backend`` (from the deploy layer, which this layer must not import) enables ``--ray``."""
    t = sub.add_parser("team", help="run a team of agents on tasks, or replay a recorded run")
    tsub = t.add_subparsers(dest="team_cmd", required=True)
    r = tsub.add_parser("run", help="run TEAM.yaml on JSONL tasks {id, input, expected}")
    r.add_argument("team", help="team YAML file")
    r.add_argument("--tasks", required=True, help="JSONL file of {id, input, expected}")
    r.add_argument("--backend", default="engine", help="engine (load the YAML's model), scripted (its script "
                                                       "rules), http (with --url), or an http:// URL")
    r.add_argument("--url", help="OpenAI-compatible server for --backend http")
    r.add_argument("--trace", help="write every call as JSONL here (and a timeline PNG beside it)")
    r.add_argument("--max-tasks", type=int)
    r.add_argument("--parallel", type=int, default=1, help="tasks in flight at once (default 1)")
    r.add_argument("--budget", type=int, help="token budget per task (overrides the YAML's budget_tokens)")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds per backend call")
    r.add_argument("--json", action="store_true")
    if ray_backend is not None:
        r.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                       help="run the agents on engine replicas on a Ray cluster (the YAML's deploy: section): auto "
                            "joins the one on this machine or starts a local one, or HOST:PORT of a Ray head")
    r.set_defaults(fn=cmd_team_run, ray_backend=ray_backend)
    p = tsub.add_parser("replay", help="re-run a trace with no model and check the outputs equal the recorded ones")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_team_replay)

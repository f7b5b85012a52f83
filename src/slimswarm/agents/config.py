"""Team YAML: pydantic schema (one-line errors naming the field), cross-reference checks, and building the Team."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import SlimswarmError
from ..models.sampling import SamplingParams
from .agent import Agent, ModelRef
from .answers import Extractor
from .team import Team


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    base: str  # smollm2-135m, stories260k, a path, ...
    compress: str | None = None  # a recipe preset or YAML applied at load (e.g. w4g128-rtn)
    adapters: dict[str, str] = {}  # adapter name -> folder (compress/lora.py AdapterBank)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_batch: int = Field(8, ge=1)
    max_len: int = Field(1024, ge=16)


class EndpointSpec(_Strict):
    url: str
    model: str | None = None
    timeout_s: float = Field(60.0, gt=0)


class ParamsSpec(_Strict):
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = []


class AgentSpec(_Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    role: str = ""
    system: str = ""
    model: str | None = None  # a key of `models` (default: the first)
    adapter: str | None = None
    endpoint: str | None = None  # a key of `endpoints`: this agent runs remotely
    params: ParamsSpec = ParamsSpec()
    capabilities: list[str] = []
    tools: list[str] = []
    tool_choice: Literal["auto", "required", "none"] = "auto"  # on structured backends (engine, HTTP)
    max_tool_calls: int = Field(3, ge=0)
    cost: float = Field(1.0, ge=0)


class RouterSpec(_Strict):
    type: Literal["rule", "bandit", "epsilon", "prompt"] = "rule"
    rules: dict[str, list[str]] = {}  # member -> keywords (rule router); also the default bandit features
    features: dict[str, list[str]] = {}  # feature group -> keywords (bandit routers)
    hashed: int = Field(0, ge=0)  # bandit router: hashed word uni/bigram features in this many buckets, not keywords
    agent: str | None = None  # prompt router: who picks
    alpha: float = Field(1.0, ge=0)
    epsilon: float = Field(0.1, ge=0, le=1)
    lam: float = Field(0.0, ge=0, alias="lambda")  # reward = accuracy − λ·cost
    seed: int = 0
    default: str | None = None


class TeamSpec(_Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    topology: Literal["pipeline", "orchestrator", "peer", "vote", "hierarchy", "route"]
    members: list[str] = Field(min_length=1)
    planner: str | None = None
    aggregator: str | None = None
    rounds: int = Field(3, ge=1)
    vote: Literal["majority", "weighted", "debate"] = "majority"
    router: RouterSpec | None = None
    capabilities: list[str] = []


class AnswerSpec(_Strict):
    labels: list[str] = []
    number: bool = False


class ScriptRule(_Strict):
    reply: str
    agent: str = "*"
    contains: str | None = None
    regex: str | None = None


class ReplicaSetSpec(_Strict):
    """How one model of the team is deployed on a Ray cluster (read by deploy/ray_runtime.py)."""
    replicas: int = Field(1, ge=0)  # 0: not deployed (agents on this model are then an error under --ray)
    resources: dict[str, float] = {}  # Ray custom resources each replica needs: these name the devices
    num_cpus: float = Field(1, ge=0)  # CPUs Ray reserves for each replica
    threads: int | None = Field(None, ge=1)  # torch threads inside a replica (default: num_cpus, at least 1)
    max_waiting: int = Field(64, ge=1)  # the replica engine's bounded queue: back-pressure beyond it


class DeploySpec(_Strict):
    """``deploy:`` in a team file: replicas per model (a key of ``models``), their resources, restarts."""
    models: dict[str, ReplicaSetSpec] = {}
    max_restarts: int = Field(3, ge=-1)  # Ray restarts of a dead replica (-1: forever)


class TeamConfig(_Strict):
    name: str = "team"
    model: ModelSpec | None = None  # shorthand for models: {default: ...}
    models: dict[str, ModelSpec] = {}
    endpoints: dict[str, EndpointSpec] = {}
    answer: AnswerSpec = AnswerSpec()
    budget_tokens: int | None = Field(None, ge=1)
    agents: list[AgentSpec] = Field(min_length=1)
    teams: list[TeamSpec] = Field(min_length=1)
    main: str | None = None  # the team that runs a task (default: the last one)
    script: list[ScriptRule] = []  # replies for --backend scripted
    deploy: DeploySpec = DeploySpec()  # used by `team run --ray` / `serve --ray`

    @model_validator(mode="after")
    def _one_model_form(self) -> "TeamConfig":
        if self.model is not None and self.models:
            raise ValueError("give either model or models, not both")
        if self.model is not None:
            self.models = {"default": self.model}
            self.model = None
        return self


def _check_refs(cfg: TeamConfig) -> None:
    """Every name a field uses must exist: agents, teams, models, adapters, endpoints; no cycles."""
    agents = {a.name: a for a in cfg.agents}
    teams = {t.name: t for t in cfg.teams}
    both = set(agents) & set(teams)
    if both:
        raise SlimswarmError(f"name {sorted(both)[0]!r} is both an agent and a team")
    for names, what in ((list(agents), "agent"), (list(teams), "team")):
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise SlimswarmError(f"{what} {dup!r} defined twice")
    for i, a in enumerate(cfg.agents):
        where = f"agents.{i} ({a.name})"
        if a.endpoint is not None:
            if a.endpoint not in cfg.endpoints:
                raise SlimswarmError(f"{where}.endpoint: unknown endpoint {a.endpoint!r} "
                                     f"(declared: {', '.join(cfg.endpoints) or 'none'})")
            continue
        if a.model is not None and a.model not in cfg.models:
            raise SlimswarmError(f"{where}.model: unknown model {a.model!r} (declared: {', '.join(cfg.models) or 'none'})")
        if a.adapter is not None:
            spec = cfg.models.get(a.model) if a.model else next(iter(cfg.models.values()), None)
            known = list(spec.adapters) if spec else []
            if a.adapter not in known:
                raise SlimswarmError(f"{where}.adapter: unknown adapter {a.adapter!r} "
                                     f"(declared: {', '.join(known) or 'none'})")
    for i, t in enumerate(cfg.teams):
        where = f"teams.{i} ({t.name})"
        for m in t.members:
            if m not in agents and m not in teams:
                raise SlimswarmError(f"{where}.members: unknown agent or team {m!r}")
        for field in ("planner", "aggregator"):
            v = getattr(t, field)
            if v is not None and v not in agents:
                raise SlimswarmError(f"{where}.{field}: unknown agent {v!r}")
        if t.topology == "orchestrator" and t.planner is None:
            raise SlimswarmError(f"{where}.planner: the orchestrator topology needs a planner agent")
        if t.topology == "route":
            if t.router is None:
                raise SlimswarmError(f"{where}.router: the route topology needs a router")
            r = t.router
            for m in list(r.rules) + ([r.default] if r.default else []):
                if m not in t.members:
                    raise SlimswarmError(f"{where}.router: unknown member {m!r} (members: {', '.join(t.members)})")
            if r.type == "prompt" and r.agent not in agents:
                raise SlimswarmError(f"{where}.router.agent: unknown agent {r.agent!r}")
    for k in cfg.deploy.models:
        if k not in cfg.models:
            raise SlimswarmError(f"deploy.models.{k}: unknown model {k!r} (declared: {', '.join(cfg.models) or 'none'})")
    if cfg.main is not None and cfg.main not in teams:
        raise SlimswarmError(f"main: unknown team {cfg.main!r}")
    # cycles: depth-first over team -> member-team edges, reporting the path that closes the loop
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise SlimswarmError("team cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for m in teams[name].members:
            if m in teams:
                visit(m, path + [name])
        state[name] = 2

    for name in teams:
        visit(name, [])


def parse_config(data, source: str = "team") -> TeamConfig:
    if not isinstance(data, dict):
        raise SlimswarmError(f"{source}: a team file is a mapping with keys agents, teams, ...")
    try:
        cfg = TeamConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise SlimswarmError(f"{source}: {where}: {err['msg']}") from None
    try:
        _check_refs(cfg)
    except SlimswarmError as e:
        raise SlimswarmError(f"{source}: {e}") from None
    return cfg


def load_team_config(path: str | Path) -> TeamConfig:
    p = Path(path)
    if not p.is_file():
        raise SlimswarmError(f"team file {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SlimswarmError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    return parse_config(data, str(p))


def build_agent(spec: AgentSpec, cfg: TeamConfig) -> Agent:
    from .tools import resolve_tool

    if spec.endpoint:
        ref = ModelRef(endpoint=spec.endpoint)
    else:
        ref = ModelRef(base=spec.model or next(iter(cfg.models), None), adapter=spec.adapter)
    p = spec.params
    params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                            seed=p.seed, stop=list(p.stop))
    return Agent(spec.name, spec.role, spec.system, ref, params, [resolve_tool(t) for t in spec.tools],
                 list(spec.capabilities), spec.cost, spec.max_tool_calls, spec.tool_choice)


def _router(spec: RouterSpec, members: list[str], agents: dict[str, Agent]):
    from . import router as R

    if spec.type == "rule":
        r = R.RuleRouter(members, spec.rules, spec.default)
    elif spec.type == "prompt":
        r = R.PromptRouter(members, agents[spec.agent])
    else:
        if spec.hashed and spec.type == "epsilon":
            raise SlimswarmError("router: hashed features need type 'bandit' (the epsilon router keys on keyword groups)")
        feats = R.HashedWordFeatures(spec.hashed) if spec.hashed else \
            R.KeywordFeatures(spec.features or spec.rules or {"any": []})
        r = R.LinUCBRouter(members, feats, spec.alpha) if spec.type == "bandit" else \
            R.EpsilonGreedyRouter(members, feats, spec.epsilon, spec.seed)
    r.lam = spec.lam
    return r


def build_team(cfg: TeamConfig) -> Team:
    """The main team, with every sub-team built once (a team used twice is the same object)."""
    agents = {a.name: build_agent(a, cfg) for a in cfg.agents}
    specs = {t.name: t for t in cfg.teams}
    extract = Extractor(cfg.answer.labels, cfg.answer.number)
    built: dict[str, Team] = {}

    def make(name: str) -> Team:
        if name not in built:
            t = specs[name]
            members = [agents[m] if m in agents else make(m) for m in t.members]
            built[name] = Team(t.name, t.topology, members, agents.get(t.planner), agents.get(t.aggregator),
                               t.rounds, t.vote, _router(t.router, t.members, agents) if t.router else None,
                               extract, list(t.capabilities))
        return built[name]

    return make(cfg.main or cfg.teams[-1].name).validate()

"""deploy/: the variants table: for one base and a list of recipes, each variant's bytes, quality (ΔPPL, KL, task
accuracy) and measured decode speed and peak memory on this machine; the file the planner reads."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import SlimswarmError
from .devices import Device, _pydantic_line, read_yaml, write_yaml_atomic

FLOAT = "fp32"  # the variant name of the uncompressed base


class Measured(BaseModel):
    decode_tokens_per_s: float
    peak_rss_bytes: int
    batch: int
    context: int
    new_tokens: int
    decode_path: str | None = None  # native (kernels/decode.c) or python: the step that was timed
    prefill_s: float | None = None  # one prefill forward of the prompt (context - new_tokens tokens), median
    # one figure per fresh process when measured in several (the fields above are then their medians)
    decode_tokens_per_s_runs: list[float] | None = None
    peak_rss_bytes_runs: list[int] | None = None
    prefill_s_runs: list[float] | None = None


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    recipe: str | None = None  # None: the base as loaded (float32)
    checkpoint: str | None = None
    params: int = Field(gt=0)
    layers: int = Field(gt=0)
    weight_bytes: int = Field(gt=0)
    bytes_by_format: dict[str, int]  # weight bytes one decode step reads, by format
    groups_by_format: dict[str, int] | None = None  # (row, group) pairs of its quantized matmuls a step, by format
    kv_bytes_per_token: int = Field(gt=0)  # K and V of one token across all layers
    hidden_size: int | None = None
    linear_params_by_format: dict[str, int] | None = None  # decoder linears' parameters by format (prefill cost)
    layer_bytes: list[int] | None = None  # weight bytes of each decoder layer (for a pipeline split)
    embed_bytes: int | None = None  # the embedding table (first stage)
    head_bytes: int | None = None  # final norm + LM head (last stage; the table again when tied)
    native_copy_bytes: int | None = Field(None, ge=0)  # resident beside the weights: the native step's repacked
    # codes (int8 activations); None: not computed yet (plan_variants_smollm2 fills it from the checkpoint)

    @property
    def resident_bytes(self) -> int:
        """Weights plus the native step's copies: what a loaded base holds."""
        return self.weight_bytes + (self.native_copy_bytes or 0)
    perplexity: float | None = None
    delta_ppl: float | None = None  # perplexity / base perplexity - 1
    kl: float | None = None  # nats per token against the base
    accuracy: dict[str, float] = Field(default_factory=dict)  # task -> accuracy (label scoring)
    measured: Measured | None = None

    @property
    def bytes_per_token(self) -> int:
        return sum(self.bytes_by_format.values())

    def linear_params(self) -> dict[str, int]:
        """Decoder-linear parameters by format (what prefill prices); a table without them puts every parameter in
        the format that holds most of the variant's bytes."""
        if self.linear_params_by_format:
            return self.linear_params_by_format
        return {max(self.bytes_by_format, key=self.bytes_by_format.get): self.params}


class VariantsTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    text: str = ""  # what perplexity and KL were measured on
    tokens: int = 0
    machine: Device  # where the speeds were measured; its cost model is the default for devices without one
    variants: list[Variant] = Field(min_length=1)

    def get(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def load_variants(path: str | Path) -> VariantsTable:
    d = read_yaml(path, "--variants")
    try:
        t = VariantsTable.model_validate(d)
    except ValidationError as e:
        raise SlimswarmError(_pydantic_line(e, str(path))) from None
    names = [v.name for v in t.variants]
    for i, n in enumerate(names):
        if names.count(n) > 1:
            raise SlimswarmError(f"{path}: field variants.{i}.name: {n!r} is used twice")
    if t.machine.cost is None:
        raise SlimswarmError(f"{path}: field machine.cost: missing (run `slimswarm devices probe` for the cost fit)")
    return t


def kv_bytes_per_token(model, dtype_bytes: int | None = None) -> int:
    c = model.config
    b = dtype_bytes or torch_dtype_bytes(model)
    return sum(2 * c.kv_heads(i) * c.head_dim * b for i in range(c.num_hidden_layers))


def torch_dtype_bytes(model) -> int:
    return model.dtype.itemsize


# -- one variant's speed and peak memory, in a fresh process --------------------------------------------------------


def measure_in_subprocess(checkpoint: str | Path, batch: int = 1, context: int = 256, new_tokens: int = 32,
                          threads: int = 1) -> Measured:
    """Peak RSS and decode tokens/s of a process that loads ``checkpoint`` and decodes ``new_tokens`` tokens for
    ``batch`` rows after a ``context - new_tokens`` prompt: a process per variant, so each peak is its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SLIMSWARM_QUIET": "1"}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "slimswarm.deploy.variants", str(checkpoint), str(batch), str(context),
           str(new_tokens), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise SlimswarmError(f"measuring {checkpoint}: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    return Measured(**json.loads(r.stdout.strip().splitlines()[-1]))


def median_of_runs(runs: list[Measured]) -> Measured:
    """One record for a variant measured in several fresh processes: each figure the median over the processes
    (a process's own noise, e.g. where its pages landed, is as large as a variant's difference), every run kept."""
    import statistics

    if not runs:
        raise ValueError("median_of_runs: no runs")
    pre = [r.prefill_s for r in runs if r.prefill_s is not None]
    first = runs[0]
    return Measured(decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs),
                    peak_rss_bytes=int(statistics.median(r.peak_rss_bytes for r in runs)), batch=first.batch,
                    context=first.context, new_tokens=first.new_tokens, decode_path=first.decode_path,
                    prefill_s=statistics.median(pre) if pre else None,
                    decode_tokens_per_s_runs=[r.decode_tokens_per_s for r in runs],
                    peak_rss_bytes_runs=[r.peak_rss_bytes for r in runs], prefill_s_runs=pre or None)


def measure_round_robin(checkpoints: dict[str, str | Path], processes: int = 3, threads: int = 1, log=print,
                        measure=None) -> dict[str, Measured]:
    """Measure every checkpoint in ``processes`` fresh processes, round-robin (each variant once, then each again:
    a slow spell of a shared machine lands on several variants' single runs instead of on one variant's all), and
    return each one's ``median_of_runs``. ``measure(checkpoint, threads=...)`` is measure_in_subprocess."""
    measure = measure or measure_in_subprocess
    runs: dict[str, list[Measured]] = {k: [] for k in checkpoints}
    for p in range(processes):
        for k, ck in checkpoints.items():
            me = measure(ck, threads=threads)
            runs[k].append(me)
            log(f"  [{p + 1}/{processes}] {k}: {me.decode_tokens_per_s:.1f} tok/s ({me.decode_path} step), prefill "
                f"{me.prefill_s if me.prefill_s is not None else float('nan'):.2f} s, "
                f"{me.peak_rss_bytes / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}")
    return {k: median_of_runs(rs) for k, rs in runs.items()}


def vm_hwm_bytes() -> int:
    """This process's peak resident bytes (VmHWM). Unlike ru_maxrss it starts afresh at exec, so a child started by
    a large parent does not report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_main(checkpoint: str, batch: int, context: int, new_tokens: int, threads: int) -> None:
    import torch

    from ..evaluate.speed import decode_tokens_per_s
    from ..models.load import load

    torch.set_num_threads(threads)
    from .costmodel import decode_path

    m = load(checkpoint).model
    timings: list[dict] = []
    rate = decode_tokens_per_s(m, batch, new_tokens, prompt_len=context - new_tokens, repeats=3, timings=timings)
    peak = vm_hwm_bytes()
    import statistics

    pre = statistics.median(t["prefill_s"] for t in timings)  # each generate's prefill of the prompt
    print(json.dumps({"decode_tokens_per_s": rate, "peak_rss_bytes": peak, "batch": batch,
                      "context": context, "new_tokens": new_tokens, "decode_path": decode_path(m),
                      "prefill_s": pre}))


# -- the table ----------------------------------------------------------------------------------------------------


def describe(model, name: str, recipe: str | None) -> Variant:
    from ..evaluate.size import weight_bytes
    from .costmodel import bytes_by_format

    v = Variant(name=name, recipe=recipe, params=model.num_parameters(), layers=model.config.num_hidden_layers,
                weight_bytes=weight_bytes(model), bytes_by_format=bytes_by_format(model),
                kv_bytes_per_token=kv_bytes_per_token(model))
    add_layout(v, model)
    return v


def add_layout(v: Variant, model) -> Variant:
    """Per-layer, embedding and head bytes (what a pipeline split needs), the decoder linears' parameters by format
    (prefill) and the quantized matmuls' groups by format (decode)."""
    from ..evaluate.size import weight_bytes

    from ..kernels import native
    from .costmodel import groups_by_format, linear_params_by_format

    v.hidden_size = model.config.hidden_size
    v.linear_params_by_format = linear_params_by_format(model)
    v.groups_by_format = groups_by_format(model)
    v.layer_bytes = [weight_bytes(layer) for layer in model.model.layers]
    v.embed_bytes = weight_bytes(model.model.embed_tokens) or weight_bytes(model.lm_head)  # tied: the head's table
    v.head_bytes = weight_bytes(model.lm_head) + weight_bytes(model.model.norm)
    v.native_copy_bytes = native.copy_bytes(model)
    return v


def measure_variants(base: str, recipes: list[str], out_dir: str | Path, machine: Device, tokens: int = 4096,
                     window: int = 512, kl_tokens: int = 2048, task_items: int = 64, tasks: tuple[str, ...] = ("sst2",),
                     log=print, processes: int = 3) -> VariantsTable:
    """Build each variant from ``base`` (``fp32`` is the base itself), save it under ``out_dir``, and measure it:
    perplexity and KL on the first ``tokens`` of the evaluation text, label-scoring accuracy on ``task_items`` test
    items per task, and decode speed and peak RSS in ``processes`` fresh processes each, round-robin over the
    variants once all are built (``measure_round_robin``). Progress goes to ``log``."""
    import torch

    from ..compress import compress
    from ..compress.recipe import load_recipe
    from ..data import default_eval_text
    from ..evaluate.choice import choice_accuracy
    from ..evaluate.kl import kl_divergence
    from ..evaluate.perplexity import perplexity
    from ..models.load import load
    from ..tasks import load_task

    for r in recipes:
        if r != FLOAT:
            load_recipe(r)  # an unknown recipe fails before any work
    out_dir = Path(out_dir)
    text, source = default_eval_text()
    log(f"variants: loading {base} ...")
    ref = load(base, dtype=torch.float32)
    items = {t: load_task(t, "test", n=task_items, seed=0) for t in tasks}
    rows: list[Variant] = []
    base_ppl = None
    for k, r in enumerate(recipes, 1):
        t0 = time.perf_counter()
        name = FLOAT if r == FLOAT else r
        log(f"[{k}/{len(recipes)}] {name}: building ...")
        meta: dict = {}
        if r == FLOAT:
            model = ref.model
        else:
            model = copy.deepcopy(ref.model)
            meta = compress(model, r, tokenizer=ref.tokenizer)
        v = describe(model, name, None if r == FLOAT else r)
        log(f"[{k}/{len(recipes)}] {name}: perplexity on {tokens} tokens, KL on {kl_tokens}, "
            f"{task_items} items of {', '.join(tasks)} ...")
        ppl = perplexity(model, ref.tokenizer, text, window, tokens, source=source).perplexity
        base_ppl = base_ppl if base_ppl is not None else (ppl if r == FLOAT else None)
        v.perplexity = ppl
        if r != FLOAT:
            v.kl = kl_divergence(ref.model, model, ref.tokenizer, text, window, kl_tokens)["kl"]
        else:
            v.kl = 0.0
        v.accuracy = {t: choice_accuracy(model, ref.tokenizer, its)["accuracy"] for t, its in items.items()}
        ck = out_dir / name
        if not (ck / "slimswarm.json").exists():
            _save_variant(model, ref, r, meta, ck)
        v.checkpoint = str(ck)
        log(f"[{k}/{len(recipes)}] {name}: {v.weight_bytes / 1e6:.0f} MB, ppl {ppl:.2f}, KL {v.kl:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
        rows.append(v)
        if model is not ref.model:
            del model
    log(f"variants: decode speed and peak memory, {processes} fresh processes each, round-robin ...")
    measured = measure_round_robin({v.name: v.checkpoint for v in rows}, processes, machine.threads, log=log)
    for v in rows:
        v.measured = measured[v.name]
    if base_ppl is None:  # no fp32 row: ΔPPL against a fresh measurement of the base
        base_ppl = perplexity(ref.model, ref.tokenizer, text, window, tokens, source=source).perplexity
    for v in rows:
        v.delta_ppl = v.perplexity / base_ppl - 1
    return VariantsTable(base=base, text=source, tokens=tokens, machine=machine, variants=rows)


def _save_variant(model, ref, recipe: str, meta: dict, ck: Path) -> None:
    from ..compress.recipe import load_recipe
    from ..models.checkpoint import file_sha256, save_checkpoint

    save_checkpoint(model, ref.tokenizer, ck, {
        "recipe": None if recipe == FLOAT else load_recipe(recipe).model_dump(),
        "quantization": meta.get("quantization", {}),
        "passes": {k: v for k, v in meta.items() if k != "quantization"},
        "parent": {"source": ref.source, "sha256": file_sha256(ref.source)}}, overwrite=True)


def ensure_checkpoints(table: VariantsTable, out_dir: str | Path, log=print) -> list[str]:
    """Build the checkpoint of every variant whose ``checkpoint`` folder is missing (the table's recipes on its base,
    no quality measurement: the table keeps its figures); returns the names built. Paths are set under ``out_dir``."""
    import torch

    from ..compress import compress
    from ..models.load import load

    out_dir = Path(out_dir)
    todo = [v for v in table.variants if not (v.checkpoint and (Path(v.checkpoint) / "slimswarm.json").exists())]
    if not todo:
        return []
    ref = load(table.base, dtype=torch.float32)
    for v in todo:
        t0 = time.perf_counter()
        recipe = v.recipe or FLOAT
        model = ref.model if recipe == FLOAT else copy.deepcopy(ref.model)
        meta = {} if recipe == FLOAT else compress(model, recipe, tokenizer=ref.tokenizer)
        ck = out_dir / v.name
        _save_variant(model, ref, recipe, meta, ck)
        v.checkpoint = str(ck)
        log(f"  built {ck} ({time.perf_counter() - t0:.0f} s)")
    return [v.name for v in todo]


def write_variants(table: VariantsTable, path: str | Path, command: str = "") -> Path:
    header = f"# Variants table written by `{command}`\n" if command else ""
    return write_yaml_atomic(table.model_dump(exclude_none=True), path, header)


if __name__ == "__main__":  # the subprocess of measure_in_subprocess
    a = sys.argv[1:]
    _measure_main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]))

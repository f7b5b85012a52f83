"""deploy/: rows and plots for the variants table and plans (Markdown tables, the per-device memory bar plot)."""

from __future__ import annotations

from pathlib import Path

from .costmodel import decode_seconds_per_token, prefill_call_seconds
from .variants import VariantsTable


def predicted_peak_bytes(v, cost, batch: int, context: int) -> int:
    """A serving process's peak: runtime floor + load transient + weights (and the native step's repacked copies of
    quantized codes) + the KV cache for ``batch`` rows of ``context`` slots."""
    return cost.runtime_bytes + cost.load_overhead_bytes + v.resident_bytes + v.kv_bytes_per_token * batch * context


def variants_rows(table: VariantsTable) -> list[dict]:
    m = table.machine
    rows = []
    for v in table.variants:
        me = v.measured
        ctx = (me.context - me.new_tokens // 2) if me else 0  # the KV a measured decode step reads, on average
        t = decode_seconds_per_token(m.cost, v.bytes_by_format, v.layers, m.bandwidth_gb_s, v.kv_bytes_per_token * ctx,
                                     v.groups_by_format)
        r = {"variant": v.name, "weight_MB": round(v.weight_bytes / 1e6, 1), "read_MB_per_token":
             round(v.bytes_per_token / 1e6, 1), "ppl": round(v.perplexity, 3) if v.perplexity else None,
             "delta_ppl_%": round(100 * v.delta_ppl, 2) if v.delta_ppl is not None else None,
             "kl": round(v.kl, 4) if v.kl is not None else None,
             **{f"acc_{k}": round(a, 3) for k, a in v.accuracy.items()},
             "pred_tok_s": round(1 / t, 2)}
        if v.measured:
            me = v.measured
            pk = predicted_peak_bytes(v, m.cost, me.batch, me.context)
            err = 100 * (1 / t / me.decode_tokens_per_s - 1)
            r.update(meas_tok_s=round(me.decode_tokens_per_s, 2))
            if me.decode_tokens_per_s_runs:  # the median of several fresh processes: their spread beside it
                runs = me.decode_tokens_per_s_runs
                r.update(processes=len(runs), meas_tok_s_range=_range(runs))
            r.update(tok_s_err_pct=round(err, 1), tok_s_within_20=abs(err) <= 20, decode_path=me.decode_path,
                     pred_peak_MiB=round(pk / 2**20), meas_peak_MiB=round(me.peak_rss_bytes / 2**20),
                     peak_err_pct=round(100 * (pk / me.peak_rss_bytes - 1), 1),
                     peak_within_20=abs(pk / me.peak_rss_bytes - 1) <= 0.2)
            if me.prefill_s is not None:
                n = me.context - me.new_tokens
                pp = prefill_call_seconds(m.cost, v.linear_params(), v.layers, n)
                r.update({f"pred_prefill{n}_s": round(pp, 3), f"meas_prefill{n}_s": round(me.prefill_s, 3)})
                if me.prefill_s_runs:
                    r[f"meas_prefill{n}_s_range"] = _range(me.prefill_s_runs, 3)
                r["prefill_err_pct"] = round(100 * (pp / me.prefill_s - 1), 1)
        rows.append(r)
    return rows


def _range(xs: list[float], digits: int = 1) -> str:
    return f"{min(xs):.{digits}f}..{max(xs):.{digits}f}"


def memory_bar_plot(per_device: dict[str, dict[str, int]], capacity: dict[str, int], path: str | Path,
                    title: str) -> Path:
    """Stacked bars, one per device: each part's bytes (bases, adapters, KV, runtime) against the device's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(capacity)
    parts = list(dict.fromkeys(k for d in per_device.values() for k in d))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 4))
    bottom = [0.0] * len(names)
    for part in parts:
        vals = [per_device.get(n, {}).get(part, 0) / 2**20 for n in names]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(names, [capacity[n] / 2**20 for n in names], marker="_", s=2000, color="black", label="capacity")
    ax.set_ylabel("MiB")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(p)
    return p

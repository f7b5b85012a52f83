"""One report for any checkpoint: quality, size and speed against the bandwidth bound, as JSON, Markdown and PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v > 10_000:
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of report rows (one row a configuration)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def roofline_plot(rows: list[dict], path: str | Path, title: str = "decode speed against the bandwidth bound") -> Path:
    """Bars of batch-1 decode tokens/s next to each configuration's bound (bandwidth / bytes per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.get("name", str(i)) for i, r in enumerate(rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["decode_tokens_per_s"] for r in rows], 0.4, label="measured, batch 1")
    ax1.bar([i + 0.2 for i in x], [r["roofline_tokens_per_s"] for r in rows], 0.4, label="bound", alpha=0.5)
    if any("decode_tokens_per_s_batch8" in r for r in rows):
        ax1.plot(list(x), [r.get("decode_tokens_per_s_batch8", 0) for r in rows], "k^", label="measured, batch 8")
    ax1.set_xticks(list(x), names, rotation=20, ha="right")
    ax1.set_ylabel("decode tokens/s")
    ax1.legend()
    ax1.set_title(title, fontsize=10)
    for r, n in zip(rows, names):
        ax2.scatter(r["bytes_per_token"] / 1e6, r["decode_tokens_per_s"], label=n)
    if rows:
        bw = rows[0]["bandwidth_gb_s"]
        xs = [r["bytes_per_token"] / 1e6 for r in rows]
        lo, hi = min(xs) * 0.5, max(xs) * 1.5
        ax2.plot([lo, hi], [bw * 1e3 / lo, bw * 1e3 / hi], "--", color="gray", label=f"{bw:.1f} GB/s bound")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("weight MB read per token")
    ax2.set_ylabel("decode tokens/s (batch 1)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], stem: str | Path, command: str, notes: list[str] = ()) -> dict[str, Path]:
    """Write STEM.json, STEM.md and (when rows carry speed) STEM.png, each atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    data = {"command": command, "notes": list(notes), "rows": rows}
    md = f"Command: `{command}`\n\n" + markdown_table(rows) + "\n" + "".join(f"\n- {n}" for n in notes) + "\n"
    for ext, text in (("json", json.dumps(data, indent=2)), ("md", md)):
        p = stem.with_suffix("." + ext)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        paths[ext] = p
    if rows and all("decode_tokens_per_s" in r and "roofline_tokens_per_s" in r for r in rows):
        paths["png"] = roofline_plot(rows, stem.with_suffix(".png"))
    return paths


NOTES_HEADING = "## Notes (written by hand"


def write_keeping_notes(path: str | Path, text: str) -> Path:
    """Write a generated results page, keeping the hand-written notes section (from a ``## Notes (written by hand``
    heading to the end) of the page it replaces; via a temporary name and a rename."""
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    i = old.find(NOTES_HEADING)
    if i >= 0:
        text = text.rstrip("\n") + "\n\n" + old[i:]
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p

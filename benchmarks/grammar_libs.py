"""xgrammar against llguidance on SmolLM2-135M's tokenizer (49,152 tokens), side by side in one run: grammar compile
time for a tool-call schema and a JSON schema, and the per-token cost of computing the next-token mask and
accepting the token, at batch 1 and 8 (one matcher a row, as the engine uses them).

    .venv/bin/pip install xgrammar==0.2.9   # the contender: not a project dependency
    .venv/bin/python benchmarks/grammar_libs.py [--repeats 5]

The token stream each matcher follows is a real tokenization (SmolLM2's tokenizer) of a valid document, so every
mask is computed in a state a model could reach. Times are medians over repeats on a shared 2-core machine: read
the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimswarm.evaluate.report import write_report  # noqa: E402
from slimswarm.models.gguf import gguf_tokenizer  # noqa: E402
from slimswarm.models.load import smollm2_gguf_path  # noqa: E402

TOOL_SCHEMA = {  # what the server builds for tools=[get_weather, add] with tool_choice="required"
    "type": "object",
    "anyOf": [
        {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
            "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}},
         "required": ["name", "arguments"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {
            "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"], "additionalProperties": False}},
         "required": ["name", "arguments"], "additionalProperties": False},
    ],
}
TOOL_DOC = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}

PLAN_SCHEMA = {  # a planner's subtask list
    "type": "object",
    "properties": {"subtasks": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
        "type": "object", "properties": {"title": {"type": "string"}, "agent": {"type": "string"},
                                         "words": {"type": "integer", "minimum": 10}},
        "required": ["title", "agent", "words"], "additionalProperties": False}}},
    "required": ["subtasks"], "additionalProperties": False,
}
PLAN_DOC = {"subtasks": [{"title": "Introduction to the history of bread", "agent": "intro_writer", "words": 120},
                         {"title": "How sourdough starters work", "agent": "body_writer", "words": 200},
                         {"title": "A short conclusion", "agent": "outro_writer", "words": 80}]}


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema):
        # a fresh compiler each time: its cache would turn the second compile into a lookup
        return self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False).compile_json_schema(
            json.dumps(schema), strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, batch):
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, m, mask, i):
        m.fill_next_token_bitmask(mask, i)

    def accept(self, m, t):
        assert m.accept_token(t), "xgrammar rejected a token of a valid document"


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tok, vocab):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema):
        m = self.llg.LLMatcher(self.tok, self.llg.LLMatcher.grammar_from_json_schema(schema))
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def bitmask(self, batch):
        return torch.full((batch, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, m, mask, i):
        v = mask[i]
        m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def accept(self, m, t):
        assert m.consume_token(t), m.get_error()


def per_token_ms(lib, compiled, tokens, batch, repeats):
    """Median over repeats of (mask + accept) time per generated token per row, running ``batch`` matchers."""
    runs = []
    for _ in range(repeats):
        ms = [lib.matcher(compiled) for _ in range(batch)]
        mask = lib.bitmask(batch)
        t = time.perf_counter()
        for tok in tokens:
            for i, m in enumerate(ms):
                lib.fill(m, mask, i)
                lib.accept(m, tok)
        runs.append((time.perf_counter() - t) * 1e3 / len(tokens))
    return statistics.median(runs)


def apply_ms(vocab, batch, repeats=50):
    """Our mask application (bits → -inf on a [batch, vocab] float logits tensor), the same for both libraries."""
    from slimswarm.engine.grammar import apply_bitmask

    logits = torch.randn(batch, vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32)
    ts = []
    for _ in range(repeats):
        x = logits.clone()
        t = time.perf_counter()
        apply_bitmask(x, mask)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grammar_libs"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = gguf_tokenizer(smollm2_gguf_path(), type("C", (), {"eos_token_id": None})())
    vocab = 49152
    rows = []
    for cls in (XGrammar, LLGuidance):
        t = time.perf_counter()
        lib = cls(tok.hf, vocab)
        setup_ms = (time.perf_counter() - t) * 1e3
        for label, schema, doc in (("tool call", TOOL_SCHEMA, TOOL_DOC), ("plan", PLAN_SCHEMA, PLAN_DOC)):
            comp = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                compiled = lib.compile(schema)
                comp.append((time.perf_counter() - t) * 1e3)
            tokens = tok.hf.encode(json.dumps(doc), add_special_tokens=False)
            row = {"library": lib.name, "schema": label, "tokenizer_setup_ms": round(setup_ms, 1),
                   "compile_ms": round(statistics.median(comp), 2), "doc_tokens": len(tokens)}
            for b in (1, 8):
                row[f"mask_ms_per_token_b{b}"] = round(per_token_ms(lib, compiled, tokens, b, args.repeats), 4)
            rows.append(row)
            print(row, flush=True)
    a1, a8 = apply_ms(vocab, 1), apply_ms(vocab, 8)
    notes = [f"applying a mask to the logits (ours, same for both): {a1:.3f} ms at batch 1, {a8:.3f} ms at batch 8",
             "mask_ms_per_token_bB: computing the next-token mask and accepting the token, for all B rows, "
             "per generated token; one torch thread, one matcher a row, serial",
             "shared 2-core machine: compare the two libraries within this run, not across runs"]
    for n in notes:
        print(n)
    cmd = "python benchmarks/grammar_libs.py " + " ".join(sys.argv[1:])
    write_report(rows, args.out, cmd.strip(), notes)


if __name__ == "__main__":
    main()

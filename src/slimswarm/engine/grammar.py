"""Engine layer: grammars for constrained decoding (JSON schema, JSON object, regex, choice, Lark), compiled by
llguidance against the engine's tokenizer and cached by their source; one matcher per request row, and the
bitmask → -inf step the engine applies to each row's logits after the forward."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SlimswarmError

_NEG_INF = torch.tensor(float("-inf"))


class GrammarError(SlimswarmError):
    """A grammar that cannot be compiled (bad schema, unsupported feature, bad regex); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``logits[i, t]`` to -inf where bit ``t`` of ``mask[i]`` is 0 (in place; logits [B, V], mask [B, words])."""
    v = logits.shape[-1]
    # numpy's unpackbits is the cheapest bits -> bytes here (0.06 ms a 49,152-token row against 0.2 for shifts)
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=-1, bitorder="little")[..., :v]
    torch.where(torch.from_numpy(bits).view(torch.bool), logits, _NEG_INF.to(logits.dtype), out=logits)


def allowed(mask: torch.Tensor, token: int) -> bool:
    """Whether bit ``token`` of a 1-D mask is set (lets a greedy row skip the -inf pass when its argmax is allowed)."""
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


# JSON as json.dumps writes it: one space after ':' and ',', no newlines. A small model has seen this layout most,
# and a fixed layout leaves it no tokens to waste on whitespace.
_JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class Grammar:
    """What a request may carry: a grammar's kind and its canonical source text (the compile cache's key)."""

    kind: str  # json_schema | regex | lark
    source: str

    @staticmethod
    def json_schema(schema: dict | str) -> "Grammar":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"JSON schema is not valid JSON: {e.msg}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return Grammar("json_schema", json.dumps(schema))  # key order kept: it is the order properties are written in

    @staticmethod
    def json_object() -> "Grammar":
        """Any JSON object (OpenAI's response_format json_object)."""
        return Grammar.json_schema({"type": "object"})

    @staticmethod
    def regex(pattern: str) -> "Grammar":
        return Grammar("regex", pattern)

    @staticmethod
    def choice(options: list[str]) -> "Grammar":
        """Exactly one of ``options`` (labels, yes/no, a vote)."""
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("choice takes a non-empty list of non-empty strings")
        return Grammar("lark", "start: " + " | ".join(json.dumps(o) for o in options))

    @staticmethod
    def lark(text: str) -> "Grammar":
        return Grammar("lark", text)

    def llguidance(self) -> str:
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_LAYOUT)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)


def json_schema_lark(schema: dict) -> str:
    """A JSON schema as a Lark rule body, for embedding in a larger grammar (a tool call's arguments)."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT})


_TOKENIZERS: dict[tuple[int, int], Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer, vocab: int):
    """llguidance's view of the tokenizer (about 1-2 s to build for a 49k vocabulary): built once per tokenizer."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        raise GrammarError(f"constrained decoding needs a Hugging Face tokenizer; this model has a "
                           f"{type(tokenizer).__name__}")
    key = (id(hf), vocab)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            import llguidance.hf

            _TOKENIZERS[key] = (hf, llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=list(tokenizer.eos_ids)))
        return _TOKENIZERS[key][1]


class GrammarCompiler:
    """Compiles grammars for one tokenizer and keeps the compiled matchers by source (LRU), so the hundredth request
    with the same tools or schema pays a copy, not a compile."""

    def __init__(self, tokenizer, vocab: int, max_cached: int = 256):
        self.tokenizer, self.vocab, self.max_cached = tokenizer, vocab, max_cached
        self.eos = sorted(set(tokenizer.eos_ids))
        self._cache: OrderedDict[Grammar, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.compiles = 0

    def compile(self, grammar: Grammar):
        """A fresh matcher for ``grammar``; GrammarError (with the library's reason) when it cannot be compiled."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return hit.deep_copy()
        from llguidance import LLMatcher

        tok = _ll_tokenizer(self.tokenizer, self.vocab)
        try:
            text = grammar.llguidance()
        except ValueError as e:
            raise GrammarError(f"invalid grammar: {e}") from None
        m = LLMatcher(tok, text, log_level=0)
        if m.is_error():
            raise GrammarError(_short(m.get_error()))
        with self._lock:
            self.compiles += 1
            self._cache[grammar] = m
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return m.deep_copy()

    def row(self, grammar: Grammar) -> "RowGrammar":
        return RowGrammar(self.compile(grammar), self.vocab, self.eos)


def _short(err: str) -> str:
    """llguidance's message on one line, without its source excerpts and caret lines."""
    import re

    keep = [ln.strip() for ln in err.strip().splitlines()
            if ln.strip() and not re.match(r"\s*(\^+|\d+\s*\|.*)\s*$", ln)]
    return " ".join(keep) or "grammar error"


class RowGrammar:
    """One request's matcher and its next-token mask: ``choose`` masks the row's logits and picks a token,
    ``accept`` advances the matcher and computes the next mask (and tells whether the grammar is complete)."""

    def __init__(self, matcher, vocab: int, eos: list[int]):
        self.matcher, self.vocab, self.eos = matcher, vocab, eos
        self.mask = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
        self._eos_words = torch.zeros_like(self.mask)
        for e in eos:
            if e < vocab:
                self._eos_words[e >> 5] |= _bit(e & 31)
        self.complete = False
        self._fill()

    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {_short(self.matcher.get_error())}")

    def choose(self, logits: torch.Tensor, sample, greedy: int | None) -> int:
        """The next token: the row's greedy pick when the grammar allows it, else a pick from the masked logits
        (``sample(logits) -> int`` draws per the request's parameters; None means greedy)."""
        if sample is None:
            tok = greedy if greedy is not None else int(torch.argmax(logits))
            if allowed(self.mask, tok):
                return tok
            apply_bitmask(logits.view(1, -1), self.mask.view(1, -1))
            return int(torch.argmax(logits))
        apply_bitmask(logits.view(1, -1), self.mask.view(1, -1))
        return sample(logits)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; True when the grammar is complete (nothing but end-of-sequence may follow)."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"grammar: token {token} refused: {_short(self.matcher.get_error())}")
        if self.matcher.is_stopped():
            self.complete = True
            return True
        self._fill()
        self.complete = self.matcher.is_accepting() and not bool(torch.any(self.mask & ~self._eos_words))
        return self.complete


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word as a Python int that fits int32 (bit 31 is the sign bit)."""
    return -(1 << 31) if i == 31 else 1 << i


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists ``properties`` and says nothing
    about extra keys, as OpenAI's strict mode has it: a grammar for an open object lets a small model wander into
    made-up keys instead of closing the object."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed_objects(v) if k not in ("properties", "$defs", "definitions", "patternProperties", "enum",
                                              "const", "default", "examples") else v) for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(k), dict):
            out[k] = {n: closed_objects(s) for n, s in schema[k].items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out

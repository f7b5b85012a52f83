"""deploy/: our tokenizer → llama.cpp's ``tokenizer.*`` GGUF keys (vocab, merges or scores, token types, special ids,
chat template), so llama.cpp needs no side files.

Two tokenizer families, the two llama.cpp runs for Llama-family models:

* byte-level BPE (SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``, the merges, and a ``pre`` name
  that selects llama.cpp's pre-tokenizer regex. We name it only where our pre-tokenizer is one llama.cpp knows
  (``PRE_TOKENIZERS``), else refuse: a wrong regex would tokenize differently without any error.
* SentencePiece-style (Llama 2, TinyStories): ``"llama"`` with per-token scores. llama.cpp merges the adjacent pair
  whose joined text has the highest score, so a BPE merge of rank r gets score -r (lower rank merges first).
"""

from __future__ import annotations

import json

from ..errors import SlimswarmError
from ..models.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

# token types (llama.h): normal, unknown, control, user-defined, unused, byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": _GPT2_REGEX, "qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizers ``pre_tokenizer`` JSON, or a one-line refusal."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own split is the GPT-2 regex
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
                and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True):
            return "smollm"
        splits = [s for s in steps if s.get("type") == "Split"]
        if len(splits) == 1 and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("use_regex", True):
            regex = splits[0].get("pattern", {}).get("Regex")
            for name, known in PRE_TOKENIZERS.items():
                if regex == known:
                    return name
    raise SlimswarmError(f"tokenizer: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent "
                         f"(known: ByteLevel, {', '.join(PRE_TOKENIZERS)})")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def vocab_fields(tok: Tokenizer, n_vocab: int) -> dict:
    """{key: value} of tokenizer.* GGUF fields for ``tok``, padded with unused tokens to the model's ``n_vocab`` rows."""
    if isinstance(tok, SentencePieceTokenizer):
        f = _sentencepiece(tok)
    elif isinstance(tok, HFTokenizer):
        f = _hf(tok)
    else:
        raise SlimswarmError(f"tokenizer of type {type(tok).__name__}: no GGUF vocabulary writer")
    tokens = f["tokenizer.ggml.tokens"]
    if len(tokens) > n_vocab:
        raise SlimswarmError(f"tokenizer has {len(tokens)} tokens, the model's embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # llama.cpp wants one token per embedding row
        tokens.append(f"[PAD{i}]")
        f["tokenizer.ggml.token_type"].append(UNUSED)
        if "tokenizer.ggml.scores" in f:
            f["tokenizer.ggml.scores"].append(-1e9)
    return f


def _special_ids(tok: Tokenizer) -> dict:
    out = {}
    if tok.bos_id is not None:
        out["tokenizer.ggml.bos_token_id"] = int(tok.bos_id)
    if tok.eos_ids:
        out["tokenizer.ggml.eos_token_id"] = int(tok.eos_ids[0])
    out["tokenizer.ggml.padding_token_id"] = int(tok.pad_id)
    return out


def _hf(tok: HFTokenizer) -> dict:
    hf = tok.hf
    spec = json.loads(hf.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SlimswarmError(f"tokenizer: model type {model.get('type')!r} has no llama.cpp equivalent (BPE only)")
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    present = set(vocab.values())
    types = [UNUSED if i not in present else NORMAL for i in range(n)]
    for i, a in added.items():
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    f: dict = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    metaspace = (spec.get("pre_tokenizer") or {}).get("type") == "Metaspace" or model.get("byte_fallback")
    if metaspace:  # SentencePiece-style BPE (Llama 2): scores from merge ranks
        f["tokenizer.ggml.model"] = "llama"
        scores = [0.0] * n
        for rank, m in enumerate(_merges(model)):
            t = vocab.get(m.replace(" ", ""))
            if t is not None and scores[t] == 0.0:
                scores[t] = -float(rank + 1)
        for text, i in vocab.items():
            if i in added and text == hf.unk_token:
                types[i] = UNKNOWN
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = BYTE
        f["tokenizer.ggml.scores"] = scores
        pre = spec.get("pre_tokenizer") or {}
        f["tokenizer.ggml.add_space_prefix"] = pre.get("prepend_scheme", "first") != "never" if pre else True
    else:
        f["tokenizer.ggml.model"] = "gpt2"
        f["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer"))
        f["tokenizer.ggml.merges"] = _merges(model)
    if hf.unk_token is not None and hf.unk_token in vocab:
        f["tokenizer.ggml.unknown_token_id"] = int(vocab[hf.unk_token])
    f.update(_special_ids(tok))
    f["tokenizer.ggml.add_bos_token"] = bool(tok._adds_bos)
    f["tokenizer.ggml.add_eos_token"] = False
    if getattr(hf, "chat_template", None):
        f["tokenizer.chat_template"] = str(hf.chat_template)
    return f


def _sentencepiece(tok: SentencePieceTokenizer) -> dict:
    sp = tok.sp
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                     else UNUSED if sp.is_unused(i) else NORMAL)
    f = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
         "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": True,
         "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    if sp.unk_id() >= 0:
        f["tokenizer.ggml.unknown_token_id"] = int(sp.unk_id())
    f.update(_special_ids(tok))
    return f

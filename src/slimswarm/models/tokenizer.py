"""One small tokenizer interface over Hugging Face tokenizers and SentencePiece models (llama2.c).

A Hugging Face tokenizer is built by transformers once and then replayed by the ``tokenizers`` library alone
(``ReplayedTokenizer``): importing transformers and building its tokenizer costs ~35-60 MB of resident memory and
about a second, more than the rest of a small model's runtime besides torch. The first load of a tokenizer
(nothing cached yet) runs transformers in a child process that fills the cache (``python -m
slimswarm.models.warm_tokenizer``), so even a process's first load never holds transformers beside its weights
(+85 MB peak on SmolLM2 otherwise); ``SLIMSWARM_TOKENIZER_CHILD=0`` keeps that first load in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SlimswarmError

REPLAY_FORMAT = 1
_BACKEND, _META = "replay_backend.json", "replay.json"


class Tokenizer:
    """encode/decode/chat with the special ids generation needs, whatever the backing library."""

    bos_id: int | None
    eos_ids: list[int]
    pad_id: int

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat, ending with the assistant's turn."""
        raise NotImplementedError

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja source), None when it has none."""
        return None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, tok: Any, eos_ids: list[int] | None = None):
        self.hf = tok
        self.bos_id = tok.bos_token_id
        ids = list(eos_ids or [])
        if tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        self.eos_ids = ids
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (ids[0] if ids else 0)
        # Does the tokenizer prepend BOS on its own? Check once rather than trusting flags.
        probe = tok.encode("a", add_special_tokens=True)
        self._adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        want = self._adds_bos if bos is None else bos
        return ([self.bos_id] if want and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.hf, "chat_template", None):
            # No template: a plain transcript the model can continue.
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None) or None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)


class ReplayedTokenizer(HFTokenizer):
    """A transformers tokenizer replayed with the ``tokenizers`` library alone: the same ids, decoded text and chat
    prompts, without importing transformers. Built from what ``describe`` saved of a tokenizer transformers loaded:
    its backend as transformers left it (added and special tokens, post-processor), its special ids, chat template
    and decode setting. ``hf`` still gives the transformers tokenizer (loaded on first use from ``hf_source``) to
    whoever needs its full API: checkpoint writers, llguidance, the GGUF exporter."""

    def __init__(self, folder: Path, meta: dict, eos_ids: list[int] | None, hf_source: Callable[[], Any]):
        from tokenizers import Tokenizer as Backend

        self._backend = Backend.from_file(str(folder / _BACKEND))
        self._backend.no_truncation()  # transformers' encode/decode run without them
        self._backend.no_padding()
        self._backend.encode_special_tokens = bool(meta["split_special_tokens"])
        self._meta, self._hf_source, self._hf = meta, hf_source, None
        self.bos_id = meta["bos_token_id"]
        ids = list(eos_ids or [])
        if meta["eos_token_id"] is not None and meta["eos_token_id"] not in ids:
            ids.append(meta["eos_token_id"])
        self.eos_ids = ids
        pad = meta["pad_token_id"]
        self.pad_id = pad if pad is not None else (ids[0] if ids else 0)
        probe = self._backend.encode("a", add_special_tokens=True).ids
        self._adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self._chat_fast = meta["chat_template"] is not None

    @property
    def hf(self):
        if self._hf is None:
            self._hf = self._hf_source()
        return self._hf

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        want = self._adds_bos if bos is None else bos
        return ([self.bos_id] if want and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self._meta["clean_up"] else text

    def chat(self, messages: list[dict[str, str]]) -> str:
        template = self._meta["chat_template"]
        if template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        if self._chat_fast:
            from .chat_template import TemplateUnsupported, render_chat

            try:
                return render_chat(template, messages, self._meta["special_tokens"])
            except TemplateUnsupported:
                self._chat_fast = False
        return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def chat_template(self) -> str | None:
        return self._meta["chat_template"]

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (WordPiece-era spacing before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _transformers_version() -> str:
    from importlib.metadata import version  # the installed version, without importing transformers

    return version("transformers")


def describe(tok: Any) -> dict | None:
    """What ``ReplayedTokenizer`` needs of a loaded transformers tokenizer, or None when its class changes what
    encode, decode or the chat template do (then only transformers itself gives the same answers)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tok)
    if not isinstance(tok, TokenizersBackend) or any(
            getattr(cls, f) is not getattr(TokenizersBackend, f)
            for f in ("encode", "_encode_plus", "decode", "_decode", "apply_chat_template", "__len__")):
        return None
    bpe = type(tok.backend_tokenizer.model).__name__ == "BPE"
    clean = bool(tok.clean_up_tokenization_spaces) and (
        not bpe or bool(getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
    template = tok.get_chat_template() if getattr(tok, "chat_template", None) else None
    special = {k: v if isinstance(v, str) else ([str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
               for k, v in tok.special_tokens_map.items()}
    return {"format": REPLAY_FORMAT, "transformers": _transformers_version(), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "split_special_tokens": bool(tok.split_special_tokens), "clean_up": clean, "chat_template": template,
            "special_tokens": special}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_meta(cache: Path) -> dict | None:
    try:
        meta = json.loads((cache / _META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != REPLAY_FORMAT or meta.get(
            "transformers") != _transformers_version():
        return None
    return meta


def _replayed(cache: Path, meta: dict | None, eos_ids, load_hf) -> ReplayedTokenizer | None:
    if meta is None or not meta.get("replay"):
        return None
    try:
        return ReplayedTokenizer(cache, meta, eos_ids, load_hf)
    except Exception:  # noqa: BLE001 - a damaged cache file: the caller rebuilds it
        return None


def fill_cache_in_child(source: tuple[str, str]) -> bool:
    """Run the first, transformers, load of a tokenizer in a child process, which writes the replay cache and exits
    (``source``: ("gguf" | "hf", path), see models/warm_tokenizer.py). True when the child succeeded; any failure
    leaves the load to the caller, in-process, where its error is reported."""
    if os.environ.get("SLIMSWARM_TOKENIZER_CHILD", "1") == "0":
        return False
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the slimswarm package
    env = {**os.environ, "SLIMSWARM_TOKENIZER_CHILD": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "slimswarm.models.warm_tokenizer", *source], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=900, check=False, text=True)
    except (OSError, subprocess.SubprocessError) as e:
        _warn_in_process(f"{type(e).__name__}: {e}")
        return False
    if done.returncode != 0:
        last = (done.stderr or "").strip().splitlines()
        _warn_in_process(last[-1] if last else f"exit code {done.returncode}")
        return False
    return True


def _warn_in_process(reason: str) -> None:
    """One line on stderr: the first load runs transformers in this process after all (+85 MB peak on SmolLM2)."""
    print(f"slimswarm: warning: tokenizer conversion in a child process failed ({reason}); converting in-process",
          file=sys.stderr)


def replayed_or_loaded(cache: Path, load_hf: Callable[[], Any], eos_ids: list[int] | None,
                       source: tuple[str, str] | None = None) -> HFTokenizer:
    """The tokenizer saved in ``cache`` replayed without transformers; else (nothing usable cached) the cache filled
    by a child process (``source`` says what it loads) and then replayed; else ``load_hf()`` (a transformers
    tokenizer) wrapped as an HFTokenizer, after saving what a later load needs in ``cache`` (when its class allows
    replay)."""
    meta = _read_meta(cache)
    tok = _replayed(cache, meta, eos_ids, load_hf)
    if tok is not None:
        return tok
    if source is not None and (meta is None or meta.get("replay")) and fill_cache_in_child(source):
        meta = _read_meta(cache)
        tok = _replayed(cache, meta, eos_ids, load_hf)
        if tok is not None:
            return tok
        if meta is None or meta.get("replay"):  # (a class that cannot replay is loaded in-process by design)
            _warn_in_process(f"its cache in {cache} does not replay")
    if meta is not None and meta.get("replay"):
        meta = None  # a damaged cache: rewritten below
    tok = load_hf()
    if meta is None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            d = describe(tok)
            if d is not None:
                _write_atomic(cache / _BACKEND, tok.backend_tokenizer.to_str())
            _write_atomic(cache / _META, json.dumps({**(d or {"format": REPLAY_FORMAT,
                                                               "transformers": _transformers_version()}),
                                                     "replay": d is not None}))
        except OSError:  # a read-only cache: every load goes through transformers
            pass
    return HFTokenizer(tok, eos_ids)


_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def folder_cache_key(folder: Path) -> str:
    """A key for a folder's tokenizer: the contents of its tokenizer files (a changed file is a new tokenizer)."""
    h = hashlib.sha1()
    for name in _TOKENIZER_FILES:
        p = folder / name
        if p.is_file():
            h.update(name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("SLIMSWARM_CACHE", Path.home() / ".cache" / "slimswarm")) / "tokenizers"


class SentencePieceTokenizer(Tokenizer):
    """A llama2.c ``tok*.model``: BOS prepended like Llama's, no chat template."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise SlimswarmError(f"{path}: not a readable SentencePiece model ({str(e).splitlines()[0][:200]})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_ids = [self.sp.eos_id()]
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_ids[0]

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        return ([self.bos_id] if bos is None or bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, *self.eos_ids)])

    def chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(m["content"] + "\n" for m in messages)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

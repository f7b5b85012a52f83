"""One small tokenizer interface over Hugging Face tokenizers and SentencePiece models (llama2.c)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SlimswarmError


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
    def vocab_size(self) -> int:
        return len(self.hf)


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

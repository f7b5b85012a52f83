"""Message: one turn of a conversation between the user, agents and tools (role, sender, content, metadata)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    content: str
    name: str | None = None  # the sender: an agent's name, a tool's name, or None for the user/system
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            from ..errors import SlimswarmError

            raise SlimswarmError(f"message role {self.role!r}: expected one of {', '.join(ROLES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["metadata"]:
            d.pop("metadata")
        if d["name"] is None:
            d.pop("name")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Message":
        return cls(d["role"], d["content"], d.get("name"), dict(d.get("metadata") or {}))


def as_chat(messages: list[Message], viewer: str | None = None) -> list[dict[str, str]]:
    """Messages as chat-template dicts seen by agent ``viewer``.

    Chat templates know only system/user/assistant, so another agent's turn and a tool result become user turns
    prefixed with their sender; only the viewer's own turns stay ``assistant``. The viewer's structured tool calls
    and their results stay OpenAI messages (``tool_calls``, role ``tool``): structured backends render them.
    """
    out = []
    for m in messages:
        if m.role == "assistant" and m.name == viewer and m.metadata.get("tool_calls"):
            out.append({"role": "assistant", "content": m.content or None, "tool_calls": m.metadata["tool_calls"]})
        elif m.role == "tool" and m.metadata.get("tool_call_id"):  # an answer to a structured call of the viewer's
            out.append({"role": "tool", "tool_call_id": m.metadata["tool_call_id"], "content": m.content})
        elif m.role == "assistant" and m.name not in (None, viewer):
            out.append({"role": "user", "content": f"{m.name}: {m.content}"})
        elif m.role == "tool":
            out.append({"role": "user", "content": f"tool {m.name or ''} result: {m.content}"})
        else:
            out.append({"role": m.role, "content": m.content})
    return out

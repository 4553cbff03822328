"""The chat conversation as plain data (no Qt): turns, the engine's messages list, and JSON persistence."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .protocol import ROLES

__all__ = ["FORMAT_VERSION", "ChatHistory", "RegionRef", "Turn"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RegionRef:
    """A pointer from a turn to a suggested or accepted segment (masks live in MRML, not in the history)."""

    code: str | None
    label: str
    segment_id: str = ""
    plane: str = ""
    index: int = -1

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegionRef:
        return cls(
            code=data.get("code"),
            label=str(data.get("label", "")),
            segment_id=str(data.get("segment_id", "")),
            plane=str(data.get("plane", "")),
            index=int(data.get("index", -1)),
        )


@dataclass
class Turn:
    """One message of the conversation."""

    role: str
    text: str
    regions: list[RegionRef] = field(default_factory=list)
    timestamp: float = field(default_factory=time.time)
    volume_id: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a string, got {type(self.text).__name__}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Turn:
        return cls(
            role=str(data["role"]),
            text=str(data["text"]),
            regions=[RegionRef.from_json(r) for r in data.get("regions", [])],
            timestamp=float(data.get("timestamp", 0.0)),
            volume_id=str(data.get("volume_id", "")),
            model=str(data.get("model", "")),
        )


class ChatHistory:
    """An ordered list of turns with helpers for the engine request and for saving.

    Example::

        history = ChatHistory()
        history.add("user", "Where is the liver?")
        body = build_ask_request(volume_id, history.messages())
    """

    def __init__(self, turns: list[Turn] | None = None) -> None:
        self.turns: list[Turn] = list(turns or [])

    def __len__(self) -> int:
        return len(self.turns)

    def __iter__(self):
        return iter(self.turns)

    def add(self, role: str, text: str, regions=(), **extra: Any) -> Turn:
        """Append a turn and return it."""
        turn = Turn(role=role, text=text, regions=list(regions), **extra)
        self.turns.append(turn)
        return turn

    def append_text(self, text: str) -> Turn:
        """Extend the last assistant turn (streamed tokens), starting one if needed."""
        if not self.turns or self.turns[-1].role != "assistant":
            return self.add("assistant", text)
        self.turns[-1].text += text
        return self.turns[-1]

    def clear(self) -> None:
        self.turns.clear()

    def messages(self, max_turns: int | None = None, system: str | None = None) -> list[dict[str, str]]:
        """The /v1/ask ``messages`` list: the last ``max_turns`` non-empty turns, optionally after a system prompt.

        Empty turns (e.g. an assistant answer cancelled before its first token) are left out: the engine's chat
        template has no meaning for them.
        """
        turns = [t for t in self.turns if t.text.strip()]
        if max_turns is not None:
            turns = turns[-max_turns:] if max_turns > 0 else []
        out = [{"role": "system", "content": system}] if system else []
        out += [{"role": t.role, "content": t.text} for t in turns]
        return out

    # -- persistence -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": "medsight-chat", "version": FORMAT_VERSION, "turns": [asdict(t) for t in self.turns]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChatHistory:
        if not isinstance(data, dict) or data.get("format") != "medsight-chat":
            raise ValueError("not a MedSIGHT chat history (missing format: medsight-chat)")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"chat history version {data.get('version')} is newer than this module understands")
        return cls([Turn.from_json(t) for t in data.get("turns", [])])

    def save(self, path: str | Path) -> Path:
        """Write as UTF-8 JSON (atomically: a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ChatHistory:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

"""history.py: turns, the messages list for /v1/ask, JSON round trip."""

from __future__ import annotations

import json

import pytest

from MedSIGHTSlicerLib.history import ChatHistory, RegionRef, Turn
from MedSIGHTSlicerLib.protocol import build_messages


def sample() -> ChatHistory:
    history = ChatHistory()
    history.add("user", "Where is the liver?", volume_id="abc")
    history.append_text("The liver ")
    history.append_text("[M0_1] is on the right.")
    history.turns[-1].regions.append(RegionRef("[M0_1]", "liver", "MedSIGHT_1", "axial", 12))
    history.add("user", "And the spleen? é ✓")
    history.add("assistant", "")  # cancelled before the first token
    return history


def test_messages_for_the_api():
    messages = sample().messages()
    assert messages == [
        {"role": "user", "content": "Where is the liver?"},
        {"role": "assistant", "content": "The liver [M0_1] is on the right."},
        {"role": "user", "content": "And the spleen? é ✓"},
    ]
    assert build_messages(messages) == messages
    assert sample().messages(max_turns=1, system="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "And the spleen? é ✓"},
    ]
    assert sample().messages(max_turns=0) == []


def test_json_round_trip(tmp_path):
    history = sample()
    path = history.save(tmp_path / "chat" / "history.json")
    back = ChatHistory.load(path)
    assert [t.__dict__ for t in back] == [t.__dict__ for t in history]
    assert back.turns[1].regions[0] == RegionRef("[M0_1]", "liver", "MedSIGHT_1", "axial", 12)
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1
    assert not (tmp_path / "chat" / "history.json.tmp").exists()


def test_bad_input():
    with pytest.raises(ValueError):
        Turn("robot", "hi")
    with pytest.raises(ValueError):
        ChatHistory.from_json({"turns": []})
    with pytest.raises(ValueError):
        ChatHistory.from_json({"format": "medsight-chat", "version": 99, "turns": []})
    history = sample()
    history.clear()
    assert len(history) == 0

"""Server-sent-events parsing and stream-event decoding, on canned bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsight.server.rle import encode_mask
from MedSIGHTSlicerLib.protocol import SSEParser, StreamEvent

CANNED = (
    b"\xef\xbb\xbf: opening comment\n"
    b"event: job\n"
    b'data: {"job_id": "j1"}\n'
    b"\n"
    b": keep-alive\r\n\r\n"
    b"event: token\r\n"
    b'data: {"slice": 0,\r\n'
    b'data: "text": "h\xc3\xa9llo \xe2\x9c\x93"}\r\n'
    b"id: 7\r\n"
    b"retry: 1000\r\n"
    b"\r\n"
    b"event: token\r"
    b'data:{"slice": 1, "text": "x"}\r'
    b"\r"
    b"event: orphan-without-data\n"
    b"\n"
    b"data: plain\n"
    b"data\n"
    b"\n"
    b"event: done\n"
    b"data: {}\n"
    b"\n"
)

EXPECTED = [
    ("job", '{"job_id": "j1"}'),
    ("token", '{"slice": 0,\n"text": "héllo ✓"}'),
    ("token", '{"slice": 1, "text": "x"}'),
    ("message", "plain\n"),
    ("done", "{}"),
]


def parse(chunks) -> list[tuple[str, str]]:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


def test_whole_stream():
    assert parse([CANNED]) == EXPECTED


def test_byte_by_byte():
    assert parse([CANNED[i : i + 1] for i in range(len(CANNED))]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(CANNED), 3))
def test_every_split_point(cut):
    assert parse([CANNED[:cut], CANNED[cut:]]) == EXPECTED


def test_events_are_returned_as_soon_as_their_blank_line_arrives():
    parser = SSEParser()
    assert parser.feed(b"event: job\ndata: 1\n") == []
    assert parser.feed(b"\n") == [("job", "1")]


def test_trailing_cr_waits_for_a_possible_lf():
    parser = SSEParser()
    assert parser.feed(b"data: a\r\n\r") == []  # the second CR might be the start of CRLF
    assert parser.feed(b"\n") == [("message", "a")]
    assert parser.feed(b"data: b\n\r") == []
    assert parser.feed(b"data: c\n") == [("message", "b")]  # the lone CR was a blank line
    assert parser.feed(b"\n") == [("message", "c")]


def test_unterminated_event_at_end_of_stream_is_dropped():
    parser = SSEParser()
    assert parser.feed(b"event: done\ndata: {}") == []
    assert parser.close() == []


def region_json(shape=(3, 4)):
    mask = np.zeros(shape, bool)
    mask[1, 1:3] = True
    return {
        "code": "[M1_2]",
        "label": "liver",
        "index": 0,
        "mask": encode_mask(mask),
        "probability": 0.75,
        "bbox": [1, 1, 1, 2],
    }


def test_stream_events_decode_to_typed_payloads():
    job = StreamEvent.from_sse("job", '{"job_id": "abc"}')
    assert (job.kind, job.job_id, job.final) == ("job", "abc", False)
    token = StreamEvent.from_sse("token", '{"slice": 2, "text": " lung"}')
    assert (token.slice, token.text) == (2, " lung")
    region = StreamEvent.from_sse("region", json.dumps({"slice": 1, "region": region_json()}))
    assert region.slice == 1
    assert region.region.mask.shape == (3, 4)
    assert region.region.mask.sum() == 2
    assert region.region.bbox == (1, 1, 1, 2)
    answer = {
        "plane": "axial",
        "index": 5,
        "text": "liver",
        "regions": [region_json()],
        "slice_to_ras": np.eye(4).tolist(),
    }
    done = StreamEvent.from_sse(
        "done", json.dumps({"job_id": "abc", "model": "tiny", "answers": [answer], "timings": {"encode": 0.1}})
    )
    assert done.final
    assert done.job_id == "abc"
    assert done.result.answers[0].slice_to_ras.shape == (4, 4)
    assert done.result.answers[0].regions[0].label == "liver"
    assert done.result.cancelled is False
    error = StreamEvent.from_sse("error", '{"code": "internal", "message": "boom"}')
    assert error.final
    assert (error.error.code, error.error.message) == ("internal", "boom")
    unknown = StreamEvent.from_sse("progress", '{"x": 1}')
    assert (unknown.kind, unknown.data, unknown.final) == ("progress", {"x": 1}, False)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [("job", "{}"), ("token", '{"slice": 0}'), ("token", "not json"), ("region", '{"slice": 0, "region": {}}')],
)
def test_malformed_events_raise_value_error(kind, payload):
    with pytest.raises(ValueError):
        StreamEvent.from_sse(kind, payload)

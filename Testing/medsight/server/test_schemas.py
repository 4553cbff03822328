"""The ask body's schema refuses a huge body with a handful of errors: the framework turns every validation error
into a dict on the server's event loop, so an error per item held health and cancel for seconds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medsight.server.schemas import AskOptions, AskRequest, SliceSelection

#: Items in a hostile body: enough that an error per item would cost the event loop noticeably.
ITEMS = 100_000
ASK = {"volume_id": "v", "messages": [{"role": "user", "content": "Where is the liver?"}]}


def _refusal(body: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        AskRequest.model_validate(body)
    return caught.value


def test_unknown_fields_are_one_error_naming_the_first_the_count_and_the_known_ones():
    """Before the fix each unknown field was its own error ("k0: Extra inputs are not permitted", 100,000 times):
    6.7 MB of them held the live server's event loop for 3-4 s."""
    err = _refusal({**ASK, **{f"k{i}": 0 for i in range(ITEMS)}})
    assert err.error_count() == 1
    (error,) = err.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ()
    assert error["msg"] == f"unknown field 'k0' (and {ITEMS - 1} more); known: {', '.join(AskRequest.model_fields)}"


def test_an_unknown_option_names_the_options_there_are():
    (error,) = _refusal({**ASK, "options": {"tempreature": 0.5}}).errors()
    assert error["loc"] == ("options",)
    assert error["msg"] == f"unknown field 'tempreature'; known: {', '.join(AskOptions.model_fields)}"


@pytest.mark.parametrize("row", [[0.0], ["a"]], ids=["numbers", "strings"])
def test_a_view_of_many_rows_is_refused_by_its_length(row):
    """Before the fix every row was read first: 1.1 million rows of a string were 1.1 million errors, and the live
    server took 12-15 s to refuse those 6.7 MB (health waiting all along)."""
    err = _refusal({**ASK, "slices": {"view": [row] * ITEMS}})
    assert err.error_count() == 1
    assert err.errors()[0]["type"] == "too_long" and err.errors()[0]["loc"] == ("slices", "view")


def test_a_view_still_needs_four_rows_of_four_numbers():
    assert SliceSelection.model_validate({"view": [[1.0, 0.0, 0.0, 0.0]] * 4}).view is not None
    for view in ([[0.0] * 4] * 3, [[0.0] * 3] * 4):
        assert "view must be a 4x4 matrix" in str(_refusal({**ASK, "slices": {"view": view}}))
    assert _refusal({**ASK, "slices": {"view": [[0.0] * 5] * 4}}).errors()[0]["type"] == "too_long"

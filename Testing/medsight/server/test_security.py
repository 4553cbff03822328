"""The bearer token check: the scheme's name in any case (RFC 9110), the token itself exactly."""

from __future__ import annotations

import pytest

from medsight.server.security import token_matches


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"])
def test_the_scheme_name_is_case_insensitive(header):
    """Before the fix only `Bearer` was accepted: a client writing `bearer` (as RFC 9110 allows) got 401."""
    assert token_matches(header, "s3cret")


@pytest.mark.parametrize("header", [None, "", "s3cret", "Bearer", "Bearer ", "Bearer S3cret", "Bearer s3cret ",
                                    "Bearer  s3cret", "Basic s3cret", "Bearers3cret", "Bearer s3cre"])
def test_anything_else_is_refused(header):
    assert not token_matches(header, "s3cret")

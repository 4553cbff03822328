"""The bearer token check: the scheme's name in any case (RFC 9110), the token itself exactly; a token every client
can send."""

from __future__ import annotations

import pytest

from medsight.server.security import check_bind, token_matches


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"])
def test_the_scheme_name_is_case_insensitive(header):
    """Before the fix only `Bearer` was accepted: a client writing `bearer` (as RFC 9110 allows) got 401."""
    assert token_matches(header, "s3cret")


@pytest.mark.parametrize("header", ["Bearer  s3cret", "bearer   s3cret"])
def test_more_than_one_space_may_separate_scheme_and_token(header):
    """RFC 9110 11.4: `credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]`. Before the fix the spaces
    after the first were read as part of the token: the right token sent after two spaces got 401."""
    assert token_matches(header, "s3cret")


@pytest.mark.parametrize("header", [None, "", "s3cret", "Bearer", "Bearer ", "Bearer  ", "Bearer S3cret",
                                    "Bearer s3cret ", "Bearer\ts3cret", "Bearer \ts3cret", "Basic s3cret",
                                    "Bearers3cret", "Bearer s3cre", "Bearer s3cret s3cret", "Bearer s 3cret"])
def test_anything_else_is_refused(header):
    assert not token_matches(header, "s3cret")


@pytest.mark.parametrize("token", [" s3cret", "s3cret ", " "])
def test_a_token_starting_or_ending_with_a_space_is_refused_at_start(token):
    """The spaces after `Bearer` are all the separator, and HTTP drops those ending a header: no client could send
    this token."""
    with pytest.raises(ValueError, match="start or end with a space"):
        check_bind("0.0.0.0", token)


@pytest.mark.parametrize("token", ["pässwörd", "€uro", "tab\tinside", "s3cret\u200b"])
def test_a_token_not_every_client_can_send_is_refused_at_start(token):
    """Before the fix the engine started with it: with "pässwörd" a UTF-8 client (curl, httpx given bytes) got 401
    while the module's Latin-1 http.client got 200; "€uro" was 401 or a UnicodeEncodeError in every client."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ValueError, match="printable ASCII") as refused:
            check_bind(host, token)
        assert token not in str(refused.value)  # the message never shows the secret


def test_printable_ascii_tokens_are_taken():
    check_bind("0.0.0.0", "".join(chr(c) for c in range(33, 127)) + " inner spaces")

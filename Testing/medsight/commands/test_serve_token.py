"""`medsight serve` takes its token from MEDSIGHT_TOKEN or --token-file, never needing it on the command line
(where every local user can read it in the process list)."""

from __future__ import annotations

import pytest

from medsight.cli import _parser, main
from medsight.commands.serve import _serve_token


def serve_args(*argv: str):
    return _parser().parse_args(["serve", *argv])


def test_token_from_file_env_or_deprecated_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDSIGHT_TOKEN", raising=False)
    assert _serve_token(serve_args()) is None
    monkeypatch.setenv("MEDSIGHT_TOKEN", "from-env")
    assert _serve_token(serve_args()) == "from-env"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert _serve_token(serve_args("--token-file", str(path))) == "from-file"
    assert _serve_token(serve_args("--token", "on-the-line")) == "on-the-line"
    assert "process list" in capsys.readouterr().err


def test_unreadable_or_empty_token_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the token file"):
        _serve_token(serve_args("--token-file", str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        _serve_token(serve_args("--token-file", str(tmp_path / "empty")))


def test_a_token_file_that_is_not_text_is_named_in_one_line(tmp_path, capsys):
    """A binary token file gave only the codec's words ("'utf-8' codec can't decode byte 0xff ..."), naming no file."""
    path = tmp_path / "token.bin"
    path.write_bytes(b"\xff\xfe\x00token")
    path.chmod(0o600)
    assert main(["serve", "--token-file", str(path), "--model", "/no/such/model/folder"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"medsight: error: the token file {path} is not UTF-8 text: write "
                                                    "the token as plain text"]


def test_help_no_longer_offers_a_token_argument():
    serve = _parser()._subparsers._group_actions[0].choices["serve"]  # argparse keeps sub-parsers here
    assert "--token-file" in serve.format_help() and "--token " not in serve.format_help()


def test_token_from_the_environment_is_stripped_as_the_module_strips_its_own(monkeypatch):
    """`set MEDSIGHT_TOKEN=abc ` (Windows keeps the trailing space) made the engine demand "abc " while the module,
    which strips the token typed into it, sent "abc": 401 with the right token. A blank one is no token (so a
    non-loopback --host is refused, instead of listening with a token no client can send)."""
    from medsight.server.security import check_bind
    from MedSIGHTSlicerLib.settings import ConnectionSettings

    typed = "s3cret \r\n"
    monkeypatch.setenv("MEDSIGHT_TOKEN", typed)
    settings = ConnectionSettings()
    settings.set_connection("http://192.0.2.1:8765", typed)
    assert _serve_token(serve_args()) == settings.token == "s3cret"
    monkeypatch.setenv("MEDSIGHT_TOKEN", " \t ")
    assert _serve_token(serve_args()) is None
    with pytest.raises(ValueError, match="without a token"):
        check_bind("0.0.0.0", _serve_token(serve_args()))

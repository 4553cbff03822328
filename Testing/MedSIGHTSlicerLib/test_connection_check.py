""""Test connection" off the main thread: start returns at once, the outcome comes through poll, errors read plainly."""

from __future__ import annotations

import time

from MedSIGHTSlicerLib.client import ERROR_HINTS, MedSIGHTClient
from MedSIGHTSlicerLib.connection_check import STARTING_HINT, ConnectionCheck

CARD = {"name": "demo (embedded)", "version": "0.3.0", "parameters": 2_550_000, "image_size": 112, "mask_size": 64,
        "num_region_codes": 576, "first_code_id": 259, "random_weights": False,
        "intended_use": "Research use only.", "config": {}}


def wait_for(check: ConnectionCheck, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = check.poll()
        if outcome is not None:
            return outcome
        time.sleep(0.01)
    raise AssertionError("no outcome")


def test_slow_engine_does_not_block_the_caller(fake):
    fake.add("GET", "/v1/model", fake.reply(200, CARD, delay=1.0))
    check = ConnectionCheck()
    t0 = time.monotonic()
    assert check.start(MedSIGHTClient(fake.url), timeout=5)
    assert time.monotonic() - t0 < 0.2  # the 1 s reply is awaited on a worker thread
    assert check.busy and not check.start(MedSIGHTClient(fake.url), timeout=5)  # one check at a time
    assert check.poll() is None
    outcome = wait_for(check)
    assert outcome.ok and outcome.card.name == "demo (embedded)" and not check.busy
    assert outcome.text.startswith("Connected: demo (embedded) 0.3.0, 2,550,000 parameters.")
    assert "RANDOM" not in outcome.text and check.poll() is None  # reported once
    assert fake.hits("GET", "/v1/model") == 1


def test_random_weights_are_flagged(fake):
    fake.add("GET", "/v1/model", fake.reply(200, {**CARD, "random_weights": True}))
    check = ConnectionCheck()
    check.start(MedSIGHTClient(fake.url), timeout=5)
    assert "RANDOM WEIGHTS: answers are meaningless." in wait_for(check).text


def test_errors_come_back_as_plain_text_saying_what_to_do(fake):
    """"Test connection" says what the chat panel says of the same error: the engine's message, the HTTP status and
    what to do (it used to show only "missing or wrong bearer token")."""
    fake.add("GET", "/v1/model", fake.reply(401, {"code": "unauthorized", "message": "missing or wrong bearer token"}))
    check = ConnectionCheck()
    check.start(MedSIGHTClient(fake.url), timeout=5)
    outcome = wait_for(check)
    assert not outcome.ok
    assert outcome.text == f"missing or wrong bearer token (HTTP 401). {ERROR_HINTS['unauthorized']}"
    check.start(MedSIGHTClient("http://127.0.0.1:9"), timeout=2)  # nothing listens on the discard port
    outcome = wait_for(check)
    assert not outcome.ok and outcome.text.endswith(ERROR_HINTS["connection_error"])
    assert "Traceback" not in outcome.text
    check.close()


def test_the_timeout_bounds_the_whole_check(fake):
    """An engine that takes the connection and never answers: the check gives up after one timeout, not one per
    attempt of the client's retries (with 3 s set it took 9.8 s: three requests and two backoffs)."""
    fake.add("GET", "/v1/model", fake.reply(200, CARD, delay=3.0))
    client = MedSIGHTClient(fake.url, retries=2)
    check = ConnectionCheck()
    check.start(client, timeout=0.3)
    outcome = wait_for(check)
    assert not outcome.ok and outcome.text.endswith(ERROR_HINTS["timeout"])
    assert fake.hits("GET", "/v1/model") == 1
    check.close()


def test_nothing_answering_while_the_local_engine_loads_says_so():
    """The local engine listens only once its model is loaded: a check before then said "Is the engine running?
    Start it with 'medsight serve'", sending the user to start a second engine. While the module's engine process
    runs, the check says it is still starting; without one, the usual hint stays."""
    import socket

    with socket.socket() as s:  # a port nothing listens on (yet)
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    check = ConnectionCheck()
    check.start(MedSIGHTClient(url, retries=0), timeout=2, local_engine_running=True)
    outcome = wait_for(check)
    assert not outcome.ok and outcome.text.endswith(STARTING_HINT)
    assert "medsight serve" not in outcome.text and f"{url}/v1/model" in outcome.text
    check.start(MedSIGHTClient(url, retries=0), timeout=2)
    assert wait_for(check).text.endswith(ERROR_HINTS["connection_error"])
    check.close()


def test_another_service_on_the_port_is_named_not_called_still_loading():
    """A program that answers, but not over HTTP (an SSH server on the URL's port), while the local engine runs: the
    check added "it listens once its model is loaded ... test again then", but waiting does not help when the URL
    names another service. Only a refused (or otherwise failed) connection gets that hint."""
    import socket
    import threading

    greeting = b"SSH-2.0-OpenSSH_9.6\r\n"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"

    def serve() -> None:  # greets each connection as an SSH server does, whatever it is sent
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            with connection:
                connection.sendall(greeting)

    threading.Thread(target=serve, daemon=True).start()
    check = ConnectionCheck()
    try:
        check.start(MedSIGHTClient(url, retries=0), timeout=2, local_engine_running=True)
        outcome = wait_for(check)
        assert not outcome.ok and "not over HTTP (it sent 'SSH-2.0-OpenSSH_9.6')" in outcome.text
        assert STARTING_HINT not in outcome.text and outcome.text.endswith(ERROR_HINTS["not_http"])
    finally:
        check.close()
        server.close()

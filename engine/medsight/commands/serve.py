"""`medsight serve`: the parent watch starts first (`watch_parent_early`); the token (file, environment, deprecated
argument), the audit file, the bind address and the port are checked before the model loads; then the engine's HTTP
server runs until stopped."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence

from medsight.commands.options import check_vision_file

#: Seconds `medsight serve` gives open requests when it is stopped, before it cancels them.
SHUTDOWN_GRACE_S = 3


def watch_parent_early(argv: Sequence[str], environment: Mapping[str, str]) -> bool:
    """Start `serve`'s parent watch (``--exit-with-parent``, or its environment variable) from the command line as
    given (``argv``: after "serve"), before the command's parser is built: the parser's imports (torch, the image
    readers) and then the model's load took 20 s and more, in which the death of the program that started the engine
    went unseen and the engine loaded on for nothing. True when the watch runs; False for a help request, or when
    the option is not written out in full (the parsed option then starts it, in `run_serve`)."""
    if "-h" in argv or "--help" in argv:
        return False
    from medsight.server.parent_watch import exit_with_parent_wanted, watch_parent  # the standard library only

    if not exit_with_parent_wanted("--exit-with-parent" in argv, environment):
        return False
    watch_parent()  # the KeyboardInterrupt it sends ends the command wherever it lands: an import, the load
    return True


def run_serve(args: argparse.Namespace) -> int:
    from medsight.server.parent_watch import exit_with_parent_wanted, watch_parent

    if exit_with_parent_wanted(args.exit_with_parent, os.environ) and not args.parent_watched:
        watch_parent()  # before the imports and the load: a parent gone meanwhile stops them

    leave_out_sklearn()
    import uvicorn

    import medsight
    from medsight.model.sizes import model_size
    from medsight.server.app import create_app
    from medsight.server.jobs import default_compute_threads
    from medsight.server.protocol import http_protocol
    from medsight.server.security import check_bind

    logging.getLogger("medsight").setLevel(args.log_level.upper())
    token = _serve_token(args)
    check_bind(args.host, token)
    check_port(args.host, args.port)
    check_vision_file(args)
    if args.audit:
        _check_audit(args.audit)
    engine = medsight.Engine.load(args.model, device=args.device, vision_file=args.vision_file,
                                  fetch_vision=args.fetch_vision, perceiver_attention=args.perceiver_attention,
                                  adapter=args.adapter)
    threads = args.threads or default_compute_threads(model_size(engine.model.config).total, engine.model.device.type)
    app = create_app(engine, token=token, max_upload_bytes=args.max_upload_mb * 1024**2,
                     request_timeout_s=args.timeout, model_name=str(args.model), host=args.host,
                     allowed_hosts=tuple(args.allow_host), max_waiting=args.max_waiting,
                     ask_memory_bytes=args.ask_memory_mb * 1024**2, compute_threads=threads, audit_path=args.audit)
    print(f"MedSIGHT engine ({args.model}) on http://{args.host}:{args.port}/v1  (API docs: /docs)", file=sys.stderr)
    # Stopping (Ctrl+C, SIGTERM) waits this long for open asks, then cancels them: it used to wait for every queued
    # ask to run, minutes with a real model.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, http=http_protocol())
    return 0


def leave_out_sklearn() -> None:
    """Keep scikit-learn out of the engine's process. transformers imports it (and with it pandas and much of scipy:
    about 700 modules, 1.3 s of CPU at each start) whenever it is installed, as soon as any of its models is
    imported: every model class inherits `GenerationMixin`, whose module imports `candidate_generator`, which imports
    `sklearn.metrics` for one feature, the confidence threshold of assisted generation (`roc_curve`), that the engine
    never uses (it runs its own generation loop). transformers has no setting for this; it asks the import system
    whether sklearn can be found, and a None entry in `sys.modules` is the import system's own way of saying that a
    module is not there (`find_spec` returns None). scikit-learn stays installed: nilearn needs it for the demo
    data, in other processes. Nothing the engine runs imports it (LoRA adapters: peft imports it only for its
    AdaMSS tuner); should something, it would fail with ModuleNotFoundError naming sklearn."""
    sys.modules.setdefault("sklearn", None)


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` as the server will, so that a port already taken (by another program, or by an engine kept
    running from an earlier Slicer session) fails now, not after the model has loaded: minutes for the full model.
    The port is released again at once; should something take it before the server binds, uvicorn still says so."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: cannot listen there ({err.strerror})") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as sock:
            # The options asyncio's server binds with: a port whose old connections linger is free, and an IPv6
            # address does not also claim the IPv4 port.
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as err:
                why = err.strerror or str(err)
                if err.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None)):  # Windows: its own code
                    why += " (by another engine or program): stop it, or choose another --port"
                raise ValueError(f"cannot listen on {host}:{port}: {why}") from None


def _check_audit(path: str) -> None:
    """Open the audit file as the server's AuditLog will, so that a folder, a missing folder or a read-only place
    fails now, not after the model has loaded."""
    from medsight.server.audit import open_audit_file

    try:
        os.close(open_audit_file(path))
    except OSError as err:
        raise ValueError(f"--audit {path}: cannot append to it ({err.strerror})") from None


def _serve_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file or MEDSIGHT_TOKEN (a --token argument still works, with a warning)."""
    if args.token:
        print("warning: --token is visible to every user of this computer (process list); use MEDSIGHT_TOKEN or "
              "--token-file", file=sys.stderr)
        return args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            raise ValueError(f"cannot read the token file {args.token_file}: {err.strerror}") from None
        except UnicodeDecodeError:  # the bare codec message named neither the file nor the option
            raise ValueError(f"the token file {args.token_file} is not UTF-8 text: write the token as plain "
                             "text") from None
        if not token:
            raise ValueError(f"the token file {args.token_file} is empty")
        _warn_if_others_can_read(args.token_file)
        return token
    # Stripped as the token file is, and as the module strips the token typed into it: Windows' `set
    # MEDSIGHT_TOKEN=abc ` keeps the trailing space, and the right token then got 401 forever.
    return os.environ.get("MEDSIGHT_TOKEN", "").strip() or None


def _warn_if_others_can_read(path: str) -> None:
    """A token file other users can read gives them the engine (POSIX permissions; Windows has no such bits)."""
    mode = os.stat(path).st_mode
    if os.name == "posix" and mode & 0o077:
        print(f"warning: other users of this computer can read the token file {path} (mode {mode & 0o777:o}); "
              f"make it yours only: chmod 600 {path}", file=sys.stderr)

"""`medusa-engine serve`: the OpenAI-compatible server (added through the `medusa_engine.commands`
entry point; FastAPI and uvicorn come with the `serve` extra and are imported only when it runs).

    medusa-engine serve --model stories260k --port 8000 [--api-key KEY]

The model flags are `chat`'s (one `EngineConfig`), except that `--attention` defaults to `sdpa`:
batched verification runs on our attention backends. uvicorn runs in a thread while the main
thread owns the signals: SIGINT / SIGTERM stop admitting (the socket closes), let in-flight
requests finish for `--shutdown-timeout` seconds (then cancel them), stop the scheduler and exit 0;
a second SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import threading
from typing import Any

from medusa_engine.cli import CLIError, add_model_args, engine_config, progress

API_KEY_ENV = "MEDUSA_API_KEY"
logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add `serve` to the `medusa-engine` command (the `medusa_engine.commands` entry point)."""
    serve = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server")
    add_arguments(serve)
    serve.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.set_defaults(attention="sdpa")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})",
    )
    p.add_argument("--served-model-name", default=None, help="the model's name in the API")
    p.add_argument("--max-batch", type=int, default=8, help="rows verified together per step")
    p.add_argument(
        "--kv-budget-mb", type=float, default=None, help="KV cache memory budget (default: none)"
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503s")
    p.add_argument(
        "--batch-plans",
        default=None,
        help="tree + lookup per batch size (tune-tree --batch-sizes); default: the heads' "
        "batch_plans.json if they ship one, else --tree and --lookup at every size",
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=128, help="prompt tokens fed per step (a newcomer's)"
    )
    p.add_argument("--max-body-kb", type=int, default=1024, help="request body size limit")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGINT / SIGTERM",
    )


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a busy port is a one-line error before the model
    loads."""
    if not 0 <= port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {port}")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as err:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from medusa_engine.server.app import ServerOptions, create_app
    except ImportError as err:
        raise CLIError(
            f"serve needs FastAPI and uvicorn ({err.name} is missing): "
            "pip install 'medusa-engine[serve]'"
        ) from None
    from medusa_engine.batch_plans import plans_for
    from medusa_engine.engine import load_engine
    from medusa_engine.scheduler import Scheduler

    config = engine_config(args)
    if config.attention == "hf":
        raise CLIError("serve batches requests on our attention: use --attention sdpa (default)")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise CLIError(f"{flag} must be positive, got {value}")
    if args.max_body_kb < 1 or not args.shutdown_timeout >= 0:
        raise CLIError("--max-body-kb must be positive and --shutdown-timeout >= 0")
    if config.static_step:
        raise CLIError("serve batches requests; --static-step runs one request at a time")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise CLIError("--api-key is empty")
    if api_key is None and not _loopback(args.host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach it may use it", args.host
        )
    sock = _bind(args.host, args.port)
    try:
        engine = load_engine(config, progress)
        scheduler = Scheduler(
            engine,
            max_batch=args.max_batch,
            kv_budget_mb=args.kv_budget_mb,
            max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk,
            plans=plans_for(config, engine.drafter, args.batch_plans),
        )
        options = ServerOptions(
            model_name=args.served_model_name or engine.model.name,
            max_context=engine.model.max_context,
            vocab_size=engine.model.vocab_size,
            api_key=api_key,
            max_tokens=config.max_new_tokens,
            sampling=config.sampling,
            max_body_bytes=args.max_body_kb * 1024,
        )
        app = create_app(scheduler, engine.model.tokenizer, options)
        scheduler.start()
        try:
            url = f"http://{args.host}:{sock.getsockname()[1]}/v1"
            _serve(app, sock, args, f"serving {options.model_name} on {url} (Ctrl-C stops)")
        finally:
            scheduler.shutdown(drain=False, timeout=10.0)  # uvicorn already let requests finish
    finally:
        sock.close()
    progress("stopped")
    return 0


def _serve(app: Any, sock: socket.socket, args: argparse.Namespace, banner: str) -> None:
    """Run uvicorn in a thread until SIGINT / SIGTERM, then shut it down gracefully."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="info" if args.verbose else "warning",
            access_log=bool(args.verbose),
            lifespan="off",
            timeout_graceful_shutdown=int(args.shutdown_timeout),
        )
    )

    def on_signal(signum: int, frame: Any) -> None:
        if server.should_exit:  # a second signal: do not wait for in-flight requests
            server.force_exit = True
        server.should_exit = True

    # uvicorn installs signal handlers only on the main thread (and re-raises the signal after a
    # graceful shutdown, which would end the process with 130/143): run it in a thread instead.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn")
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        thread.start()
        while thread.is_alive() and not server.started:
            thread.join(0.02)
        if server.started:
            progress(banner)
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.should_exit:
        raise CLIError("the HTTP server stopped on its own (run with -v for its log)")

"""`leanfit serve`: one base model, the adapters of a registry directory, an OpenAI-compatible API.

    leanfit serve --model minilm --adapters adapters/ --port 8000
    leanfit serve --model smollm2-135m --adapters adapters/ --api-key secret --max-adapters 64

Nothing heavy (torch, FastAPI, uvicorn) is imported until the command runs.
"""

from __future__ import annotations

import os
import re
import sys

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def add_commands(subparsers) -> dict:
    s = subparsers.add_parser("serve", help="serve a base model with many adapters over an OpenAI-compatible API")
    s.add_argument("--model", required=True,
                   help="zoo name (minilm, smollm2-135m) or a local Hugging Face model folder")
    s.add_argument("--adapters", required=True, metavar="DIR",
                   help="registry directory: one adapter per subdirectory, as written by lf.save or by `leanfit tune` "
                        "on a causal LM (a classifier's adapter trains its head, which a shared base cannot serve)")
    s.add_argument("--task", choices=["embedding", "causal-lm"],
                   help="what to serve (default: causal-lm for causal LMs, else embedding)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--api-key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' (default: $LEANFIT_API_KEY; none if unset)")
    s.add_argument("--max-adapters", dest="max_adapters", type=int, default=32,
                   help="adapters kept loaded at once; the least recently used is unloaded first (default 32)")
    s.add_argument("--max-adapter-memory", dest="max_adapter_memory", metavar="SIZE",
                   help="cap on the loaded adapters' memory (their tensors and the stacked copy mixed batches keep of "
                        "low-rank factors), e.g. 512MB or 2GiB (default: no cap)")
    s.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=32,
                   help="requests run together in one batch at most (default 32)")
    s.add_argument("--batch-window-ms", dest="batch_window_ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5 ms)")
    s.add_argument("--no-hot-merge", dest="hot_merge", action="store_false",
                   help="never merge a single-adapter batch's adapter into the base weights")
    s.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    return {"serve": _serve}


def parse_size(text: str | None) -> int | None:
    """Bytes from '512MB', '2GiB', '1000000' (None stays None)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"Memory size {text!r} is not understood; write e.g. 512MB, 2GiB or a number of bytes.")
    return int(float(match.group(1)) * _UNITS[unit])


def _serve(args) -> int:
    from pathlib import Path

    if not Path(args.adapters).is_dir():
        raise ConfigError(f"The adapter registry '{args.adapters}' is not a directory; create it (adapters go in "
                          "its subdirectories) or pass another --adapters.")
    one = Path(args.adapters).resolve()
    if (one / "adapter.json").is_file():  # one adapter, where a folder of them is wanted
        raise ConfigError(f"'{args.adapters}' is an adapter, not a registry of adapters; pass the folder that holds it "
                          f"('{one.parent}' serves it as '{one.name}').")
    for option, value in (("--max-adapters", args.max_adapters), ("--max-batch-size", args.max_batch_size)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}.")
    import signal

    from .app import run

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again: a stop asked
    # for is the normal end of a server, so it exits 0 (a process manager sends SIGTERM).
    signal.signal(signal.SIGTERM, stop)
    try:
        run(args.model, args.adapters, host=args.host, port=args.port,
            api_key=args.api_key or os.environ.get("LEANFIT_API_KEY") or None, task=args.task,
            max_adapters=args.max_adapters, max_adapter_bytes=parse_size(args.max_adapter_memory),
            max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms, log_level=args.log_level,
            hot_merge=args.hot_merge)
    except KeyboardInterrupt:
        pass
    print("leanfit: server stopped.", file=sys.stderr)
    return 0

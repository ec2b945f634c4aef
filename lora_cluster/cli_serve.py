"""``lora-cluster serve``: the OpenAI-style Ray Serve app in the foreground until interrupted.

Joins the Ray cluster at ``--address`` or starts an embedded local one, starts Serve's HTTP
proxy on ``--host:--port``, deploys ``deploy.app.build_app`` and waits; SIGINT / SIGTERM
delete the app, stop Serve and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from typing import Any

from lora_cluster.cli_format import progress


def add_serve_parser(sub: Any) -> None:
    """Register ``serve`` on the CLI's subparsers (called by ``cli.build_parser``)."""
    from lora_cluster.cli import _add_config_flags

    p = sub.add_parser("serve", help="run the OpenAI-style Ray Serve app in the foreground")
    p.add_argument("--json", action="store_true", help="machine-readable startup line")
    p.add_argument("--model", required=True, help="base model directory (or hub id)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="replicas behind the router")
    p.add_argument("--admin-token", default=None,
                   help="bearer token for load/unload (default: $LORA_CLUSTER_ADMIN_TOKEN)")
    p.add_argument("--app-name", default="lora_cluster", help="Serve application name")
    p.add_argument("--spill-threshold", type=int, default=None,
                   help="ongoing requests at which a replica holding an adapter counts as "
                        "saturated (default: --max-num-seqs)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: an embedded local Ray)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from lora_cluster.cli import _config_from_args
    from lora_cluster.cluster.ray_session import ensure_ray

    config = _config_from_args(args, args.model)  # validate before starting anything
    # Serve's INFO lines would interleave with our progress lines; warnings still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    settings: dict[str, Any] = {"replicas": args.replicas, "admin_token": args.admin_token,
                                "spill_threshold": args.spill_threshold}
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress("starting Ray", not args.json):
            ensure_ray(args.address, config.namespace)
        from ray import serve

        from deploy.app import build_app, served_model_name

        url = f"http://{args.host}:{args.port}"
        with progress(f"starting {args.replicas} replica(s) of {config.world_size} rank(s)",
                      not args.json):
            serve.start(http_options={"host": args.host, "port": args.port})
            serve.run(build_app(config, **settings), name=args.app_name, route_prefix="/")
        info = {"url": url, "model": served_model_name(config), "replicas": args.replicas,
                "app": args.app_name}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"serving {info['model']!r} at {url} ({args.replicas} replica(s)); "
                  f"Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _shutdown(args.app_name, embedded=args.address is None, show=not args.json)
    return 0


def _shutdown(app_name: str, *, embedded: bool, show: bool) -> None:
    """Delete the app; on our own embedded Ray also stop Serve and Ray itself.

    On a shared cluster (``--address``) Serve keeps running for other applications.
    """
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    with progress(f"stopping {app_name!r}", show):
        try:
            serve.delete(app_name)
            if embedded:
                serve.shutdown()
        finally:
            ray.shutdown()
    if show:
        print("stopped", flush=True)

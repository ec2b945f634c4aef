"""``lora-cluster``: demo, start/stop/status of a named cluster, adapters, generation."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

from lora_cluster.cli_format import format_table, print_json, progress
from lora_cluster.config import ClusterConfig, SamplingParams
from lora_cluster.errors import ClusterError, LoRAClusterError

DEFAULT_NAME = "default"
STATE_DIR = Path(os.environ.get("LORA_CLUSTER_STATE_DIR", Path.home() / ".cache" / "lora_cluster"))
# ClusterConfig fields the CLI does not expose as flags (set elsewhere or not scalar).
HEAD_AUTH_MODE = "token"
_HIDDEN_FIELDS = {"model", "extra_env", "adapter_roots", "address"}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every scalar ClusterConfig field as ``--field-name`` (plus --tp / --ep aliases)."""
    hints = typing.get_type_hints(ClusterConfig)
    for f in dataclasses.fields(ClusterConfig):
        if f.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *{"tp_size": ["--tp"], "ep_size": ["--ep"]}.get(f.name, [])]
        hint = hints[f.name]
        args = typing.get_args(hint)
        if hint is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None)
            continue
        kind: Any = str
        choices = None
        if typing.get_origin(hint) is typing.Literal:
            choices = list(args)
        else:
            base = [a for a in args if a is not type(None)] or [hint]
            if base[0] in (int, float):
                kind = base[0]
        parser.add_argument(*names, dest=f.name, type=kind, choices=choices, default=None,
                            help=f"(default: {f.default})")
    parser.add_argument("--adapter-roots", nargs="*", default=None,
                        help="directories adapters may be loaded from")


def _config_from_args(args: argparse.Namespace, model: str) -> ClusterConfig:
    values: dict[str, Any] = {"model": model}
    for f in dataclasses.fields(ClusterConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("model",):
            values[f.name] = tuple(v) if f.name == "adapter_roots" else v
    return ClusterConfig(**values)


def _state(name: str) -> dict[str, Any]:
    path = _state_file(name)
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError):
        return {}


def _connect(args: argparse.Namespace) -> Any:
    """The named cluster, at --address, else where ``start`` recorded it, else Ray's 'auto'."""
    state = _state(args.name)
    address = args.address or state.get("address") or "auto"
    if state.get("auth_mode") and not args.address:
        os.environ["RAY_AUTH_MODE"] = state["auth_mode"]  # before Ray is imported
    from lora_cluster.cluster.handle import Cluster

    return Cluster.connect(args.name, address=address, namespace=args.namespace)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_bin() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


# ---- commands ----------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from lora_cluster.demo import run_demo

    return run_demo(cache_dir=Path(args.cache_dir), device=args.device or "cpu",
                    as_json=args.json, max_tokens=args.max_tokens)


def _state_file(name: str) -> Path:
    return STATE_DIR / "clusters" / f"{name}.json"


def cmd_start(args: argparse.Namespace) -> int:
    config = _config_from_args(args, args.model)  # validate before starting anything
    head_session, head_pgid = None, None
    address = args.address
    if address is None:
        # Token auth on the head we own; set before Ray is imported (it reads the mode then).
        os.environ["RAY_AUTH_MODE"] = HEAD_AUTH_MODE
        with progress("starting a local Ray head", not args.json):
            address, head_session, head_pgid = _start_head(
                _state_file(args.name).with_suffix(".ray.log"))
    from lora_cluster.cluster.handle import Cluster

    config = config.replace(address=address)
    with progress(f"starting cluster {args.name!r} ({config.world_size} ranks)", not args.json):
        cluster = Cluster.start(config, name=args.name)
    state = {"name": args.name, "address": address, "namespace": config.namespace,
             "head_session": head_session, "head_pgid": head_pgid,
             "auth_mode": HEAD_AUTH_MODE if head_session else None, "model": args.model}
    _state_file(args.name).parent.mkdir(parents=True, exist_ok=True)
    _state_file(args.name).write_text(json.dumps(state))
    stats = cluster.stats()
    if args.json:
        print_json({"started": args.name, **state, "stats": stats})
    else:
        print(f"cluster {args.name!r} is running ({config.world_size} ranks, device "
              f"{stats.get('device', config.device)})")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    state_path = _state_file(args.name)
    state = _state(args.name)
    with progress(f"stopping cluster {args.name!r}", not args.json):
        cluster = _connect(args)
        cluster.shutdown()
        if state.get("head_session"):
            import ray

            ray.shutdown()
            _stop_head(state["head_session"], state.get("head_pgid"))
    state_path.unlink(missing_ok=True)
    if args.json:
        print_json({"stopped": args.name})
    else:
        print(f"cluster {args.name!r} stopped")
    return 0


_SESSION = re.compile(rb"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def _start_head(log_path: Path, timeout_s: float = 120.0) -> tuple[str, str, int]:
    """A Ray head that outlives the CLI: (address, Ray session name, `ray start` group id)."""
    port = _free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [_ray_bin(), "start", "--head", f"--port={port}", "--block",
             "--disable-usage-stats", "--include-dashboard=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"ray start exited with {proc.returncode}; see {log_path}")
        text = log_path.read_bytes()
        # The GCS port opens before the head is ready; `ray start` prints this once it is.
        session = _SESSION.search(text)
        if b"Ray runtime started" in text and session:
            return f"127.0.0.1:{port}", session.group().decode(), proc.pid
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise ClusterError(f"ray head did not come up within {timeout_s:.0f}s; see {log_path}")


def _stop_head(session: str, pgid: int | None, timeout_s: float = 8.0) -> None:
    """Stop every process of the head ``start`` launched, and only those (``ray stop`` would
    stop every Ray on this machine): the `ray start` process group, and the daemons, which
    all carry the head's session name on their command line."""

    def signal_all(sig: signal.Signals) -> None:
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        subprocess.run(["pkill", f"-{sig.name[3:]}", "-f", session], capture_output=True)

    def alive() -> bool:
        if subprocess.run(["pgrep", "-f", session], capture_output=True).returncode == 0:
            return True
        if pgid is None:
            return False
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.3)
    if alive():
        signal_all(signal.SIGKILL)


def cmd_status(args: argparse.Namespace) -> int:
    stats = _connect(args).stats()
    if args.json:
        print_json(stats)
        return 0
    rows = [(k, v) for k, v in sorted(stats.items()) if not isinstance(v, (dict, list))]
    print(format_table(["field", "value"], rows))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with progress(f"loading adapter {args.adapter!r}", not args.json):
        info = _connect(args).load_adapter(args.adapter, args.source)
    if args.json:
        print_json(info)
    else:
        print(f"loaded {info.name!r}: rank {info.rank}, {len(info.target_modules)} target kinds, "
              f"{info.load_ms:.0f} ms, residency {info.residency}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    _connect(args).evict_adapter(args.adapter)
    if args.json:
        print_json({"evicted": args.adapter})
    else:
        print(f"evicted {args.adapter!r}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    cluster = _connect(args)
    (cluster.pin_adapter if args.command == "pin" else cluster.unpin_adapter)(args.adapter)
    print_json({args.command: args.adapter}) if args.json else print(f"{args.command}ned {args.adapter!r}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    infos = _connect(args).list_adapters()
    if args.json:
        print_json(infos)
        return 0
    rows = [(i.name, i.residency, i.rank, f"{i.scaling:.3g}", i.version, "yes" if i.pinned else "",
             f"{i.load_ms:.0f}", i.source) for i in infos]
    print(format_table(["name", "residency", "rank", "scaling", "version", "pinned", "load ms",
                        "source"], rows))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
    results = _connect(args).generate(list(args.prompt), adapters=args.adapter, sampling=sampling)
    if args.json:
        print_json(results)
        return 0
    rows = [(r.adapter or "(base)", p, r.text if r.text is not None else list(r.token_ids),
             r.finish_reason) for p, r in zip(args.prompt, results)]
    print(format_table(["adapter", "prompt", "output", "finish"], rows))
    return 0


# ---- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, *, cluster: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if cluster:
            p.add_argument("--name", default=DEFAULT_NAME, help="cluster name")
            p.add_argument("--address", default=None, help="Ray address (default: auto)")
            p.add_argument("--namespace", default="lora_cluster")
        return p

    p = add("demo", "tiny MoE model + 4 adapters on an embedded cluster", cluster=False)
    p.add_argument("--cache-dir", default=str(STATE_DIR / "demo"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--max-tokens", type=int, default=12)
    p.set_defaults(func=cmd_demo)

    p = add("start", "start a named, detached cluster", cluster=False)
    p.add_argument("--model", required=True)
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local head)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_start)

    add("stop", "stop a named cluster").set_defaults(func=cmd_stop)
    add("status", "show a named cluster's stats").set_defaults(func=cmd_status)
    p = add("load", "load (register) an adapter")
    p.add_argument("adapter", help="adapter name")
    p.add_argument("source", help="adapter directory or hub id")
    p.set_defaults(func=cmd_load)
    p = add("evict", "unregister an adapter")
    p.add_argument("adapter")
    p.set_defaults(func=cmd_evict)
    for verb in ("pin", "unpin"):
        p = add(verb, f"{verb} an adapter in a device slot")
        p.add_argument("adapter")
        p.set_defaults(func=cmd_pin)
    add("list", "list registered adapters").set_defaults(func=cmd_list)
    p = add("generate", "generate completions")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--adapter", default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)
    from lora_cluster.cli_serve import add_serve_parser

    add_serve_parser(sub)
    from lora_cluster.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LoRAClusterError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {type(exc).__name__}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

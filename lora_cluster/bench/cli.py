"""``lora-cluster bench``: the end-to-end benchmark from the command line.

    lora-cluster bench --preset cpu-tiny                      # the full CPU sweep
    lora-cluster bench --preset cpu-tiny --adapters 1,5 --duration 5 --parts engine
    lora-cluster bench --preset h100-moe --parts engine,steptime --out benchmarks/results
    lora-cluster bench --preset h100-moe --parts merged,peft --update benchmarks/results/e2e_h100-moe.json
    lora-cluster bench --render benchmarks/results/e2e_h100-moe.json --out benchmarks/results

Writes ``<out>/e2e_<preset>.json`` and ``.png``, prints the table (or the JSON with --json);
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path.home() / ".cache" / "lora_cluster" / "bench"
# Literal copies of presets.PRESETS and sweep.PARTS (kept equal by a test), so that building
# the CLI's parser imports no torch.
PRESET_NAMES = ("cpu-tiny", "h100-moe")
PART_NAMES = ("engine", "steptime", "merged", "peft")


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"adapter counts must be >= 1, got {text!r}")
    return counts


def add_bench_parser(sub: Any) -> None:
    """Register ``bench`` on the CLI's subparsers (called by ``cli.build_parser``)."""
    p = sub.add_parser("bench", help="end-to-end benchmark: 1 … 10,000 adapters vs HF PEFT")
    p.add_argument("--json", action="store_true", help="print the result JSON, not the table")
    p.add_argument("--preset", default="cpu-tiny", choices=PRESET_NAMES)
    p.add_argument("--adapters", type=_counts, default=None,
                   help="adapter counts N (default: the preset's, e.g. 1,5,8,32,100,1000,10000)")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds of each closed-loop phase")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each")
    p.add_argument("--open-duration", type=float, default=None,
                   help="seconds of Poisson arrivals per N")
    p.add_argument("--rate", type=float, default=None,
                   help="open-loop requests/s, the same for every N (default: the preset's: "
                        "cpu-tiny 20; h100-moe half the smallest N's closed-loop rate)")
    p.add_argument("--clients", type=int, default=None, help="closed-loop clients")
    p.add_argument("--baseline-duration", type=float, default=None,
                   help="measured seconds of each baseline phase")
    p.add_argument("--peft-max-adapters", type=int, default=None)
    p.add_argument("--merged-max-adapters", type=int, default=None)
    p.add_argument("--max-loras", type=int, default=None)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--parts", default=",".join(PART_NAMES),
                   help=f"what to run, comma-separated from {','.join(PART_NAMES)}")
    p.add_argument("--backend", default="ray", choices=["ray", "local"],
                   help="ray: the real cluster; local: one in-process rank without Ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="closed-loop rounds over every N; ratios to N=5 are paired round by "
                        "round (cancels a shared host's drift; default 1)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="where the model and adapters are written once and reused")
    p.add_argument("--out", default="bench-results", help="directory for the JSON and PNG")
    p.add_argument("--update", default=None, metavar="JSON",
                   help="merge this run's parts into an earlier result file of the same preset")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="run nothing: print the table of a result file and draw its PNG in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)


def _preset_from_args(args: argparse.Namespace) -> Any:
    from lora_cluster.bench.presets import get_preset

    preset = get_preset(args.preset)
    changes = {field: getattr(args, arg) for field, arg in (
        ("duration_s", "duration"), ("warmup_s", "warmup"), ("open_duration_s", "open_duration"),
        ("clients", "clients"), ("baseline_duration_s", "baseline_duration"),
        ("peft_max_adapters", "peft_max_adapters"), ("merged_max_adapters", "merged_max_adapters"),
        ("max_loras", "max_loras"), ("max_cpu_loras", "max_cpu_loras"),
        ("max_num_seqs", "max_num_seqs")) if getattr(args, arg) is not None}
    return preset.replace(**changes) if changes else preset


def _command_line() -> str:
    """How this run was started, for the result file (the wrapper script or the CLI)."""
    script = Path(sys.argv[0])
    prog = f"python {script.parent.name}/{script.name}" if script.name == "e2e.py" else "lora-cluster"
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])


def _render(path: Path, out: Path, as_json: bool) -> int:
    from lora_cluster.bench.report import format_report, plot

    result = json.loads(path.read_text())
    png = out / f"{path.stem}.png"
    note = plot(result, png)
    print(json.dumps(result, indent=1, sort_keys=True) if as_json else format_report(result))
    print(note or f"wrote {png}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lora_cluster.bench.report import format_report, merge_results, plot, write_json
    from lora_cluster.bench.sweep import BenchOptions, run_bench

    preset = _preset_from_args(args)
    if args.render:
        return _render(Path(args.render), Path(args.out), args.json)
    opts = BenchOptions(
        preset=preset, adapter_counts=args.adapters or preset.adapter_counts,
        cache_dir=Path(args.cache_dir), backend=args.backend,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()), rate=args.rate,
        seed=args.seed, rounds=args.rounds, show_progress=not args.no_progress,
        command=_command_line())
    result = run_bench(opts)
    if args.update:
        result = merge_results(json.loads(Path(args.update).read_text()), result)
    out = Path(args.out)
    json_path = write_json(result, out / f"e2e_{preset.name}.json")
    png_note = plot(result, out / f"e2e_{preset.name}.png")
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=float))
    else:
        print(format_report(result))
    print(f"wrote {json_path}" + (f"; {png_note}" if png_note else
                                  f" and {out / f'e2e_{preset.name}.png'}"), file=sys.stderr)
    return 0

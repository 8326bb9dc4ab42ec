"""The `vmem` command: replay, info, serve, stress.

    vmem replay --compare          the bundled Azure trace through vmem, paged and static caches
    vmem info [--json]             backend, granularity, limits, what the machine supports
    vmem serve [...]               OpenAI-compatible server (vmem.server.app)
    vmem stress [...]              allocator stress test (vmem.stress)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vmem.errors import VmemError, VmemInvalidArgument


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # serve and stress own their flags; hand them the rest of the line untouched.
    if argv and argv[0] == "serve":
        from vmem.server import app
        return _rc(app.main(argv[1:]))
    if argv and argv[0] == "stress":
        from vmem import stress
        return _rc(stress.main(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except VmemError as e:
        print("vmem %s: error: %s" % (args.command, e), file=sys.stderr)
        return 1


def _rc(value) -> int:
    return value if isinstance(value, int) else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmem", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (vmem serve --help)", add_help=False)
    sub.add_parser("stress", help="allocator stress test (vmem stress --help)", add_help=False)

    info = sub.add_parser("info", help="backend, granularity, limits, what the machine supports")
    info.add_argument("--backend", default="auto", choices=("auto", "host", "cuda"))
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    r = sub.add_parser("replay", help="run a trace through the engine on the wall clock",
                       description="Replay a trace through the reference engine, arrivals paced on the wall clock.")
    r.add_argument("--trace", help="Azure or BurstGPT CSV (default: the bundled Azure conversation trace)")
    r.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of a trace, N seeded synthetic requests (Gamma arrivals, Zipf lengths)")
    r.add_argument("--compare", action="store_true", help="run vmem, paged and static on the same requests")
    r.add_argument("--cache", default="vmem", choices=("vmem", "paged", "static"),
                   help="cache kind without --compare (default vmem)")
    r.add_argument("--start", type=float, default=None, help="window start in trace seconds")
    r.add_argument("--duration", type=float, default=None, help="window length in trace seconds")
    r.add_argument("--max-requests", type=int, default=None, help="at most this many requests (default 320)")
    r.add_argument("--arrivals", default=None, choices=("burst", "paced", "trace"),
                   help="burst (default): every request waiting at t=0, each cache at saturation; paced: "
                        "--load x the static cache's measured capacity, or --rate; trace: the trace's timing "
                        "x --time-scale")
    r.add_argument("--time-scale", type=float, default=None,
                   help="with --arrivals trace: multiply arrival times (0.5 = twice the trace's rate)")
    r.add_argument("--rate", type=float, default=None, help="with --arrivals paced/trace: this mean rate (req/s)")
    r.add_argument("--load", type=float, default=None,
                   help="with --arrivals paced and no --rate: LOAD x the static cache's capacity, measured "
                        "first (default 1.2)")
    r.add_argument("--length-scale", type=float, default=None, help="multiply prompt lengths")
    r.add_argument("--output-scale", type=float, default=None, help="multiply output lengths")
    r.add_argument("--max-prompt-tokens", type=int, default=None)
    r.add_argument("--max-output-tokens", type=int, default=None)
    r.add_argument("--model", default=None, help="model preset (tiny, small)")
    r.add_argument("--max-batch", type=int, default=None, help="request slots per cache")
    r.add_argument("--max-seq-len", type=int, default=None)
    r.add_argument("--memory-mib", type=float, default=None, help="physical KV budget for every cache")
    r.add_argument("--page-bytes", type=int, default=None, help="vmem page size")
    r.add_argument("--backend", default=None, choices=("auto", "host", "cuda"))
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    r.add_argument("--goodput", nargs="+", metavar="METRIC:MS", default=None,
                   help="SLOs for goodput as in vllm bench serve, e.g. ttft:1000 tpot:50 (metrics: ttft, tpot, e2el)")
    r.add_argument("--json", default="out/replay.json", help="JSON output path")
    r.add_argument("--png", default="out/replay.png", help="figure path")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_replay)
    return p


def _replay_config(args):
    from vmem.replay import ReplayConfig
    # --rate or --load alone mean paced arrivals; nothing said means the saturating burst
    paced = args.rate is not None or args.load is not None
    cfg = ReplayConfig(arrivals=args.arrivals or ("paced" if paced else "burst"))
    pairs = {"trace": args.trace, "synthetic": args.synthetic or None, "start_s": args.start,
             "duration_s": args.duration, "max_requests": args.max_requests, "time_scale": args.time_scale,
             "rate": args.rate, "load": args.load, "length_scale": args.length_scale, "output_scale": args.output_scale,
             "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
             "model": args.model, "max_batch": args.max_batch, "max_seq_len": args.max_seq_len,
             "page_bytes": args.page_bytes, "backend": args.backend, "seed": args.seed,
             "threads": args.threads}
    for name, value in pairs.items():
        if value is not None:
            setattr(cfg, name, value)
    if args.memory_mib is not None:
        cfg.memory_bytes = int(args.memory_mib * 2**20)
    if args.goodput:
        cfg.slos_ms = _parse_slos(args.goodput)
    return cfg


def _parse_slos(items: list[str]) -> dict:
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise VmemInvalidArgument("--goodput metric must be ttft, tpot or e2el, got %r" % name)
        try:
            slos[name] = float(value)
        except ValueError:
            raise VmemInvalidArgument("--goodput takes METRIC:MS pairs such as ttft:1000, got %r" % item) from None
    return slos


def cmd_replay(args) -> int:
    from vmem import replay
    cfg = _replay_config(args)
    kinds = replay.CACHE_KINDS if args.compare else (args.cache,)
    result = replay.replay(cfg, kinds, progress=not args.no_progress)
    json_path = replay.write_json(result, args.json)
    try:
        png_path = replay.plot(result, args.png)
    except ImportError:                       # matplotlib is the optional `bench` extra
        png_path = "none (pip install 'vmem[bench]' for the figure)"
    w = result["workload"]
    when = ("all waiting at t=0" if cfg.arrivals == "burst"
            else "over %.1f s (%.2f req/s)" % (w["span_s"], w["rate_per_s"]))
    print("workload: %d requests %s, prompt mean %.0f tokens, output mean %.0f tokens; %.2f MiB of KV for "
          "every cache" % (w["num_requests"], when, w["prompt_tokens"]["mean"], w["output_tokens"]["mean"],
                           result["memory_bytes"] / 2**20))
    skipped = max(r["num_skipped"] for r in result["runs"].values())
    if skipped:
        print("skipped %d requests that failed in the trace or exceed --max-seq-len" % skipped)
    cal = result.get("calibration")
    if cal:
        print("arrivals paced at %.2f x the %.1f req/s the static cache served in a %d-request probe"
              % (cal["load"], cal["static_capacity_req_s"], cal["probe_requests"]))
    print(replay.format_table(result))
    print("JSON: %s" % json_path)
    print("figure: %s" % png_path)
    return 0


def machine_info(backend: str = "auto") -> dict:
    """What vmem sees on this machine: backend, limits, huge pages, CUDA."""
    info: dict = {}
    try:
        from vmem.backends import get_backend
        b = get_backend(backend)
        info["backend"] = b.name
        info["device"] = str(b.device)
        info["granularity_bytes"] = b.granularity_bytes
        info.update({k: v for k, v in b.info().items() if k not in ("backend", "device", "granularity_bytes")})
    except (VmemError, ImportError, OSError) as e:
        info["backend"] = None
        info["backend_error"] = "%s: %s" % (type(e).__name__, e)
    info["vm.max_map_count"] = _read_int("/proc/sys/vm/max_map_count")
    info["process_mappings_in_use"] = _count_lines("/proc/self/maps")
    info["address_space_bits"] = _address_bits()
    info["hugepages_total"] = _meminfo().get("HugePages_Total")
    info["hugepage_size_kib"] = _meminfo().get("Hugepagesize")
    info["shmem_thp"] = _read_text("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    info["cpu_count"] = os.cpu_count()
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_devices"] = torch.cuda.device_count() if info["cuda_available"] else 0
    except ImportError:
        info["cuda_available"] = False
    from vmem._version import __version__
    info["vmem"] = __version__
    return info


def cmd_info(args) -> int:
    info = machine_info(args.backend)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print("%-*s  %s" % (width, k, v))
    return 0


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    return int(text) if text and text.lstrip("-").isdigit() else None


def _count_lines(path: str) -> int | None:
    text = _read_text(path)
    return None if text is None else len(text.splitlines())


def _meminfo() -> dict:
    out = {}
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def _address_bits() -> str | None:
    for line in (_read_text("/proc/cpuinfo") or "").splitlines():
        if line.startswith("address sizes"):
            return line.partition(":")[2].strip()
    return None


if __name__ == "__main__":
    sys.exit(main())

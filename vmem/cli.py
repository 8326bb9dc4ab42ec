"""The `vmem` command: replay, info, serve, stress.

    vmem replay --compare          the bundled Azure trace through vmem, paged and static caches
    vmem info [--json]             backend, granularity, limits, what the machine supports
    vmem serve [...]               OpenAI-compatible server (vmem.server.app)
    vmem stress [...]              allocator stress test (vmem.stress)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from vmem.errors import VmemError, VmemInvalidArgument


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except VmemError as e:
        print("vmem %s: error: %s" % (args.command, e), file=sys.stderr)
        return 1


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see %s --help)\n" % (self.prog, message, self.prog))


# Spelled here, not imported, so `vmem --help` starts without torch; tests/test_cli.py checks they equal
# vmem.allocator.CACHE_KINDS, vmem.replay.ARRIVALS and the backends get_backend takes.
CACHE_KINDS = ("vmem", "paged", "static")
BACKENDS = ("auto", "host", "cuda")
ARRIVALS = ("burst", "paced", "trace")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole `vmem` command (every subcommand's flags); ``args.func(args)`` runs it."""
    p = _Parser(prog="vmem", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command")
    info = sub.add_parser("info", help="backend, granularity, limits, what the machine supports")
    info.add_argument("--backend", default="auto", choices=BACKENDS)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)
    _add_replay(sub)
    _add_serve(sub)
    _add_stress(sub)
    return p


# -- argument types: a bad value is a usage error (exit 2) that names the flag -----------------------

def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
        if value < lo or (hi is not None and value > hi):
            where = "in [%d, %d]" % (lo, hi) if hi is not None else ">= %d" % lo
            raise argparse.ArgumentTypeError("must be %s, got %d" % (where, value))
        return value
    return parse


def _float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False):
    """A finite float in [lo, hi], or (lo, hi] when ``lo_open``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number: %r" % text) from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
            where = "%s%g, %s" % ("(" if lo_open else "[", lo, "inf)" if hi == math.inf else "%g]" % hi)
            raise argparse.ArgumentTypeError("must be a finite number in %s, got %r" % (where, text))
        return value
    return parse


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parse_bytes(text: str) -> int:
    """``"512M"`` -> 536870912; plain integers are bytes; a size must be positive."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)
    except (ValueError, OverflowError):   # OverflowError: int(float("inf"))
        raise argparse.ArgumentTypeError("not a byte size: %r" % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive byte size, got %r" % text)
    return value


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")   # uvicorn's


# -- replay ----------------------------------------------------------------------------------------

def _add_replay(sub) -> None:
    r = sub.add_parser("replay", help="run a trace through the engine on the wall clock",
                       description="Replay a trace through the reference engine, arrivals paced on the wall clock.")
    r.add_argument("--trace", help="Azure or BurstGPT CSV (default: the bundled Azure conversation trace)")
    r.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of a trace, N seeded synthetic requests (Gamma arrivals, Zipf lengths)")
    r.add_argument("--compare", action="store_true", help="run vmem, paged and static on the same requests")
    r.add_argument("--cache", default="vmem", choices=CACHE_KINDS,
                   help="cache kind without --compare (default vmem)")
    r.add_argument("--start", type=float, default=None, help="window start in trace seconds")
    r.add_argument("--duration", type=float, default=None, help="window length in trace seconds")
    r.add_argument("--max-requests", type=int, default=None, help="at most this many requests (default 320)")
    r.add_argument("--arrivals", default=None, choices=ARRIVALS,
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
    r.add_argument("--model", default=None, help="model preset (tiny, small, medium; default small)")
    r.add_argument("--max-batch", type=int, default=None, help="request slots per cache")
    r.add_argument("--max-seq-len", type=int, default=None)
    r.add_argument("--memory-mib", type=float, default=None, help="physical KV budget for every cache")
    r.add_argument("--page-bytes", type=int, default=None, help="vmem page size")
    r.add_argument("--backend", default=None, choices=BACKENDS)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    r.add_argument("--goodput", nargs="+", metavar="METRIC:MS", default=None,
                   help="SLOs for goodput as in vllm bench serve, e.g. ttft:1000 tpot:50 (metrics: ttft, tpot, e2el)")
    r.add_argument("--json", default="out/replay.json", help="JSON output path")
    r.add_argument("--png", default="out/replay.png", help="figure path")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_replay)


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


# -- serve -----------------------------------------------------------------------------------------

SERVER_EXTRA_MODULES = ("fastapi", "starlette", "uvicorn", "pydantic", "h11", "anyio")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the reference engine",
                       description="OpenAI-compatible HTTP server over the vmem reference engine (docs/server.md).")
    p.add_argument("--model", default="tiny",
                   help="a preset (tiny, small, medium; default tiny) or a local Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype (auto: the checkpoint's; float32 for presets)")
    p.add_argument("--cache", default="vmem", choices=CACHE_KINDS)
    p.add_argument("--memory", type=parse_bytes, default=None,
                   help="physical KV memory, e.g. 256M or 2G (default: every slot at full length)")
    p.add_argument("--kv-budget", default=None, metavar="NAME",
                   help="share one KV budget with other servers: a name (/dev/shm/vmem-kv-NAME) or a path; "
                        "--memory is its total, used when this server creates it (vmem cache only)")
    p.add_argument("--kv-budget-min", type=parse_bytes, default=None, metavar="SIZE",
                   help="with --kv-budget: memory guaranteed to this server (must be free at start)")
    p.add_argument("--max-batch", type=_int_in(1), default=16)
    p.add_argument("--max-seq-len", type=_int_in(1), default=None)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default: loopback only; elsewhere, set --api-key)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8000)
    p.add_argument("--api-key", type=_nonempty, default=os.environ.get("VMEM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $VMEM_API_KEY; none: no auth)")
    p.add_argument("--max-prompt-tokens", type=_int_in(1), default=None, help="longer prompts get 400")
    p.add_argument("--max-tokens", type=_int_in(1), default=None, help="largest max_tokens a request may ask")
    p.add_argument("--max-queued", type=_int_in(1), default=512, help="queued requests before 429")
    p.add_argument("--max-body-bytes", type=parse_bytes, default=None,
                   help="larger request bodies get 413 before they are read "
                        "(default: 32 bytes per token of max-seq-len, at least 1M)")
    p.add_argument("--max-connections", type=_int_in(1), default=1024,
                   help="open connections; a request on one more gets 503 (default: 1024)")
    p.add_argument("--header-timeout", type=_float_in(0, lo_open=True), default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers (default: 10)")
    p.add_argument("--body-timeout", type=_float_in(0, lo_open=True), default=30.0, metavar="S",
                   help="seconds a request may take to send its body; then 408 (default: 30)")
    p.add_argument("--shutdown-timeout", type=_float_in(0), default=10.0, metavar="S",
                   help="seconds running requests get to finish on SIGTERM/SIGINT; then 503 (default: 10)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached prompt prefixes (default: on; --no-enable-prefix-caching turns it off)")
    p.add_argument("--torch-threads", type=_int_in(1), default=None,
                   help="torch intra-op threads (default: torch's); 1 suits small models on busy cores")
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        from vmem.server import app
    except ModuleNotFoundError as exc:   # a base install, without the server extra
        if (exc.name or "").partition(".")[0] not in SERVER_EXTRA_MODULES:
            raise
        print("vmem serve: needs the server extra (no module %r): pip install 'vmem[server]'" % exc.name,
              file=sys.stderr)
        return 2
    return app.serve(args)


# -- stress ----------------------------------------------------------------------------------------

def _add_stress(sub) -> None:
    p = sub.add_parser("stress", help="allocator stress test (randomised traffic, injected faults)",
                       description="Allocator stress test for your own configuration (vmem/stress.py): "
                                   "randomised traffic and injected faults on a VirtualKVCache; nothing may be lost.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=_float_in(0, lo_open=True), default=10.0, help="run this long")
    p.add_argument("--max-ops", type=_int_in(0), default=0, help="stop after this many operations (0: no limit)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--page-bytes", type=int, default=65536)
    p.add_argument("--layout", default="NHD", choices=["NHD", "HND", "GROUPED"])
    p.add_argument("--group", type=int, default=1, help="layers per group (GROUPED layout)")
    p.add_argument("--memory-mb", type=_float_in(0, lo_open=True), default=128, help="physical KV budget")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--reclaim", default="deferred", choices=["deferred", "eager"])
    p.add_argument("--async", dest="async_map", action="store_true", help="prefetch steps on the native worker")
    p.add_argument("--fault-rate", type=_float_in(0, 1), default=0.02,
                   help="share of steps with an injected native failure")
    p.add_argument("--check-every", type=_int_in(0), default=0, help="ops between integrity checks (0: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.set_defaults(func=cmd_stress)


def cmd_stress(args) -> int:
    from vmem import stress
    return stress.run(args)


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

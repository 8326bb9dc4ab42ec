"""Tiny random Hugging Face checkpoints made here, with transformers' save_pretrained (no download).

Each directory holds what a real one does: config.json, model.safetensors (or shards + index),
generation_config.json, tokenizer.json (a byte-level BPE trained here with `tokenizers`),
tokenizer_config.json and chat_template.jinja. Used by tests/test_hf_*.py and bench/e2e.py.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL = ["<|begin|>", "<|end|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
BOS, EOS, PAD, EOT = 0, 1, 2, 5

CORPUS = [
    "the quick brown fox jumps over the lazy dog while the virtual memory manager maps pages on demand",
    "a key value cache grows with every token and shrinks when a request finishes; pages are reused",
    "import torch; def forward(self, x): return self.linear(x) + 1  # 12345 67890",
    "Hello, world! How are you today? I am fine, thank you. Numbers: 3.14159, 2.71828, 1e-5.",
    "Les caches de clés et de valeurs — ça marche aussi en français, avec des accents: é è à ü ß ✓",
]

# A Llama-3-like template: bos, headers, raise_exception for a bad role, a default system message.
TEMPLATE_HEADERS = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny model.<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Qwen-like template: block whitespace control (trim_blocks / lstrip_blocks matter), tools via tojson,
# loop controls, namespace, and {% generation %}.
TEMPLATE_TOOLS = """{%- set ns = namespace(n=0) -%}
{% if tools %}
<|im_start|>system
Tools: {{ tools | tojson(indent=2) }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' and loop.index0 > 0 %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

ARCHS = {
    # name: (transformers classes, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   rope_theta=500000.0, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE over CORPUS with SPECIAL first (ids 0..5) and a BOS-adding post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B",
                                                       special_tokens=[("<|begin|>", BOS)])
    return tok


def make_checkpoint(path, arch: str, *, dtype: str = "float32", vocab_size: int = 384, hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    max_position: int = 512, initializer_range: float = 0.2, seed: int = 0,
                    chat_template: str = TEMPLATE_HEADERS, max_shard_size: str | None = None,
                    tokenizer=None, **overrides) -> Path:
    """Save a random `arch` model (ARCHS) and a tokenizer to `path`; returns the path.

    initializer_range 0.2 (transformers' default is 0.02) so that greedy outputs of the random model are
    varied rather than one repeated token, which makes token-for-token comparison meaningful.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    path = Path(path)
    config_cls, model_cls, arch_overrides = ARCHS[arch]
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position, initializer_range=initializer_range, rms_norm_eps=1e-6,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **{**arch_overrides, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():                   # norms and biases away from their init (ones, zeros) so they matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model = model.to(getattr(torch, dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, EOT], pad_token_id=PAD).save_pretrained(path)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer or train_tokenizer(vocab_size),
                                   bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path

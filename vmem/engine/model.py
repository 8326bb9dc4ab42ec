"""A small Llama-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) in PyTorch.

Weights are drawn from a seeded generator, so a (config, seed) pair always gives the same model and
nothing is downloaded. Attention goes through the KV cache manager: ``cache.attention(layer, q, k, v,
cache_seqlens, slots)`` appends the new K/V and attends (docs/structure.md). ``forward_full`` is the
cache-free oracle the engine's tests compare against.

    input_ids [B, S] -> embed -> L x (x + attn(norm(x)); x + mlp(norm(x))) -> norm -> lm_head -> logits [B, S, V]
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vmem.engine.tokenizer import ByteTokenizer
from vmem.errors import VmemInvalidArgument


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. head_dim * num_heads need not equal hidden_size (as in Llama 3 / Qwen)."""
    vocab_size: int = ByteTokenizer.vocab_size
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    dtype: torch.dtype = torch.float32
    seed: int = 0
    max_position: int = 4096
    rms_norm_eps: float = 1e-5
    init_gain: float = 1.0     # weight std = init_gain / sqrt(fan_in)

    def __post_init__(self):
        if isinstance(self.dtype, str):                   # "bfloat16" from a command line
            object.__setattr__(self, "dtype", getattr(torch, self.dtype.replace("torch.", ""), self.dtype))
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_position")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise VmemInvalidArgument("ModelConfig.%s must be a positive int, got %r" % (name, value))
        if self.num_heads % self.num_kv_heads:
            raise VmemInvalidArgument("num_heads (%d) must be a multiple of num_kv_heads (%d)"
                                      % (self.num_heads, self.num_kv_heads))
        if self.head_dim % 2:
            raise VmemInvalidArgument("head_dim must be even for rotary embeddings, got %d" % self.head_dim)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise VmemInvalidArgument("dtype must be float32, float16 or bfloat16, got %s" % self.dtype)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size: "tiny" (tests), "small" (demos on 2 CPU cores), "medium" (heavier benchmarks)."""
        if name not in PRESETS:
            raise VmemInvalidArgument("unknown model preset %r; choose one of %s" % (name, sorted(PRESETS)))
        return cls(**{**PRESETS[name], **overrides})

    @property
    def num_params(self) -> int:
        attn = self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim \
            + self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + 2 * self.vocab_size * self.hidden_size \
            + self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        """K + V bytes one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=704),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                   intermediate_size=1408),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class DecoderLayer(nn.Module):
    """Pre-norm block. wqkv packs q, k, v ([(Hq + 2 Hkv) * D, hidden]); w_gate_up packs gate and up."""

    def __init__(self, cfg: ModelConfig, gen: torch.Generator):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.dtype)
        self.post_attention_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.dtype)
        self.wqkv = _weight((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h, cfg, gen)
        self.wo = _weight(h, cfg.num_heads * d, cfg, gen)
        self.w_gate_up = _weight(2 * cfg.intermediate_size, h, cfg, gen)
        self.w_down = _weight(h, cfg.intermediate_size, cfg, gen)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> q [B, S, Hq, D], k, v [B, S, Hkv, D], rotary applied to q and k."""
        b, s, _ = x.shape
        q, k, v = F.linear(self.input_norm(x), self.wqkv).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim], dim=-1)
        q = _rotate(q.view(b, s, self.num_heads, self.head_dim), cos, sin)
        k = _rotate(k.view(b, s, self.num_kv_heads, self.head_dim), cos, sin)
        return q, k, v.reshape(b, s, self.num_kv_heads, self.head_dim)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output [B, S, Hq, D], then the SwiGLU MLP."""
        x = x + F.linear(attn.reshape(x.shape[0], x.shape[1], -1), self.wo)
        gate, up = F.linear(self.post_attention_norm(x), self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)


class Model(nn.Module):
    """The decoder. ``forward`` runs through a KV cache manager; ``forward_full`` needs none."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        gen = torch.Generator().manual_seed(cfg.seed)
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen).to(cfg.dtype),
                                  requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, gen) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.lm_head = _weight(cfg.vocab_size, cfg.hidden_size, cfg, gen)
        # rotary table for every position, computed once in float64: [max_position, head_dim] float32
        half = cfg.head_dim // 2
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(cfg.max_position, dtype=torch.float64).unsqueeze(1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, slots: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] int64 (S new tokens per sequence); slots, cache_seqlens [B] int32 (cache rows and
        tokens already cached). Returns logits [B, S, vocab] float32.

        Token s of sequence b sits at position cache_seqlens[b] + s. Each layer calls
        ``cache.attention(layer, q, k, v, cache_seqlens, slots)``, which appends k/v; the caller has made
        room for cache_seqlens + S tokens (cache.step).
        """
        b, s = self._check_ids(input_ids)
        if not isinstance(slots, torch.Tensor) or not isinstance(cache_seqlens, torch.Tensor) \
                or tuple(slots.shape) != (b,) or tuple(cache_seqlens.shape) != (b,):
            raise VmemInvalidArgument("slots and cache_seqlens must be [batch=%d] int32 tensors" % b)
        positions = cache_seqlens.to(self.device, torch.int64).unsqueeze(1) + torch.arange(s, device=self.device)
        self._check_positions(positions)
        cos, sin = self._rope(positions)
        x = F.embedding(input_ids.to(self.device), self.embed)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            x = layer.finish(x, cache.attention(i, q, k, v, cache_seqlens, slots))
        return self._logits(x)

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The oracle: input_ids [B, S] int64 from position 0, causal attention over the whole sequence,
        no cache. Returns logits [B, S, vocab] float32."""
        b, s = self._check_ids(input_ids)
        positions = torch.arange(s, device=self.device).expand(b, s)
        self._check_positions(positions)
        cos, sin = self._rope(positions)
        x = F.embedding(input_ids.to(self.device), self.embed)
        group = self.config.num_heads // self.config.num_kv_heads
        for layer in self.layers:
            q, k, v = layer.qkv(x, cos, sin)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, dim=1),
                v.transpose(1, 2).repeat_interleave(group, dim=1), is_causal=True)
            x = layer.finish(x, o.transpose(1, 2))
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.lm_head).float()

    def _rope(self, positions: torch.Tensor):
        """cos, sin [B, S, 1, D] (float32) for NeoX-style rotation (halves, as in Hugging Face Llama)."""
        return self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2)

    def _check_ids(self, input_ids) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64 \
                or input_ids.numel() == 0:
            raise VmemInvalidArgument("input_ids must be a non-empty [batch, seqlen] int64 tensor, got %s"
                                      % (getattr(input_ids, "shape", type(input_ids).__name__),))
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise VmemInvalidArgument("token id %d is outside the vocabulary [0, %d)"
                                      % (lo if lo < 0 else hi, self.config.vocab_size))
        return input_ids.shape[0], input_ids.shape[1]

    def _check_positions(self, positions: torch.Tensor) -> None:
        if int(positions.max()) >= self.config.max_position:
            raise VmemInvalidArgument("position %d is beyond max_position %d"
                                      % (int(positions.max()), self.config.max_position))


def _weight(out_features: int, in_features: int, cfg: ModelConfig, gen: torch.Generator) -> nn.Parameter:
    w = torch.randn(out_features, in_features, generator=gen) * (cfg.init_gain / math.sqrt(in_features))
    return nn.Parameter(w.to(cfg.dtype), requires_grad=False)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by position (computed in float32, returned in x's dtype)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

"""A Llama-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) in PyTorch.

Two sources of weights: a seeded generator (the presets: a (config, seed) pair always gives the same
model, nothing is downloaded) or a Hugging Face checkpoint directory (``Model.from_pretrained``, see
loader.py: Llama incl. Llama 3 rope scaling, Mistral, Qwen2's q/k/v bias, Qwen3's q/k norm, tied
embeddings). Attention goes through the KV cache manager: ``cache.attention(layer, q, k, v,
cache_seqlens, slots)`` appends the new K/V and attends (docs/structure.md). ``forward_full`` is the
cache-free oracle the engine's tests compare against.

    input_ids [B, S] -> embed -> L x (x + attn(norm(x)); x + mlp(norm(x))) -> norm -> lm_head -> logits [B, S, V]
    attn: q, k, v = split(x @ wqkv.T + bqkv); q, k = rope(q_norm(q), k_norm(k)); o = attention(q, k, v) @ wo.T + bo
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
class RopeScaling:
    """Hugging Face's ``rope_scaling`` / ``rope_parameters`` kinds the model implements.

    "linear": every inverse frequency divided by ``factor``. "llama3" (Llama 3.1+): wavelengths above
    original_max_position / low_freq_factor divided by ``factor``, below original_max_position /
    high_freq_factor kept, smoothly interpolated between.
    """
    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise VmemInvalidArgument("rope scaling %r is not implemented (linear, llama3)" % (self.rope_type,))
        if not self.factor > 0 or (self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor):
            raise VmemInvalidArgument("bad rope scaling parameters: %s" % (self,))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. head_dim * num_heads need not equal hidden_size (as in Llama 3 / Qwen).

    Architecture switches (all off for the presets): qkv_bias (Qwen2), o_bias (Llama's attention_bias),
    qk_norm (Qwen3: RMSNorm over head_dim of q and k before rotary), tie_word_embeddings (lm_head is the
    embedding). sliding_window: the checkpoint's window; the engine has no sliding-window attention, so
    the loader caps max_position at it (within the window both attentions agree).
    """
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
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None

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
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise VmemInvalidArgument("rope_scaling must be a RopeScaling or None, got %r" % (self.rope_scaling,))
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise VmemInvalidArgument("sliding_window must be a positive int or None, got %r" % (self.sliding_window,))

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size: "tiny" (tests), "small" (demos on 2 CPU cores), "medium" (heavier benchmarks)."""
        if name not in PRESETS:
            raise VmemInvalidArgument("unknown model preset %r; choose one of %s" % (name, sorted(PRESETS)))
        return cls(**{**PRESETS[name], **overrides})

    @property
    def num_params(self) -> int:
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn = self.hidden_size * qkv + self.num_heads * self.head_dim * self.hidden_size \
            + qkv * self.qkv_bias + self.hidden_size * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embeddings + self.hidden_size

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
    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Weights:
    """Where the parameters come from, by their state_dict name (``layers.0.wqkv``).

    ``tensors=None``: drawn from a generator seeded with cfg.seed (linear weights with std
    init_gain / sqrt(fan_in), the embedding with std 1, norms ones, biases zeros), in a fixed order.
    Otherwise the checkpoint's tensors, already renamed and packed by loader.py; a missing name or
    another shape raises VmemInvalidArgument.
    """

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.tensors = tensors
        self.gen = torch.Generator().manual_seed(cfg.seed) if tensors is None else None

    def get(self, name: str, shape: tuple[int, ...], init: str) -> nn.Parameter:
        """init: "linear" | "normal" | "ones" | "zeros" (used only without tensors)."""
        if self.tensors is not None:
            t = self.tensors.get(name)
            if t is None or tuple(t.shape) != shape:
                raise VmemInvalidArgument("weight %s: expected shape %s, got %s"
                                          % (name, shape, None if t is None else tuple(t.shape)))
        elif init == "linear":
            t = torch.randn(shape, generator=self.gen) * (self.cfg.init_gain / math.sqrt(shape[-1]))
        elif init == "normal":
            t = torch.randn(shape, generator=self.gen)
        else:
            t = torch.ones(shape) if init == "ones" else torch.zeros(shape)
        return nn.Parameter(t.to(self.cfg.dtype), requires_grad=False)


class DecoderLayer(nn.Module):
    """Pre-norm block. wqkv packs q, k, v ([(Hq + 2 Hkv) * D, hidden]); w_gate_up packs gate and up."""

    def __init__(self, cfg: ModelConfig, w: Weights, i: int):
        super().__init__()
        h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        p = "layers.%d." % i
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.input_norm = RMSNorm(w.get(p + "input_norm.weight", (h,), "ones"), cfg.rms_norm_eps)
        self.post_attention_norm = RMSNorm(w.get(p + "post_attention_norm.weight", (h,), "ones"), cfg.rms_norm_eps)
        self.wqkv = w.get(p + "wqkv", (qkv, h), "linear")
        self.wo = w.get(p + "wo", (h, cfg.num_heads * d), "linear")
        self.w_gate_up = w.get(p + "w_gate_up", (2 * f, h), "linear")
        self.w_down = w.get(p + "w_down", (h, f), "linear")
        self.bqkv = w.get(p + "bqkv", (qkv,), "zeros") if cfg.qkv_bias else None
        self.bo = w.get(p + "bo", (h,), "zeros") if cfg.o_bias else None
        self.q_norm = RMSNorm(w.get(p + "q_norm.weight", (d,), "ones"), cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w.get(p + "k_norm.weight", (d,), "ones"), cfg.rms_norm_eps) if cfg.qk_norm else None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> q [B, S, Hq, D], k, v [B, S, Hkv, D], rotary applied to q and k."""
        b, s, _ = x.shape
        q, k, v = F.linear(self.input_norm(x), self.wqkv, self.bqkv).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v.reshape(b, s, self.num_kv_heads, self.head_dim)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output [B, S, Hq, D], then the SwiGLU MLP."""
        x = x + F.linear(attn.reshape(x.shape[0], x.shape[1], -1), self.wo, self.bo)
        gate, up = F.linear(self.post_attention_norm(x), self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)


class Model(nn.Module):
    """The decoder. ``forward`` runs through a KV cache manager; ``forward_full`` needs none.

    ``Model(config)`` draws seeded weights; ``Model(config, tensors)`` takes them by state_dict name;
    ``Model.from_pretrained(path)`` reads a Hugging Face checkpoint directory (loader.py).
    ``name``: what the server lists in /v1/models unless told otherwise.
    """

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor] | None = None, *, name: str = ""):
        super().__init__()
        self.config = cfg = config
        self.name = name
        w = Weights(cfg, tensors)
        self.embed = w.get("embed", (cfg.vocab_size, cfg.hidden_size), "normal")
        self.layers = nn.ModuleList(DecoderLayer(cfg, w, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(w.get("norm.weight", (cfg.hidden_size,), "ones"), cfg.rms_norm_eps)
        self.lm_head = self.embed if cfg.tie_word_embeddings else \
            w.get("lm_head", (cfg.vocab_size, cfg.hidden_size), "linear")
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)   # [head_dim / 2] float32
        self.eval()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str | None = None) -> "Model":
        """A Hugging Face checkpoint directory (config.json + safetensors); dtype None / "auto": the
        checkpoint's. Raises VmemInvalidArgument (missing file or tensor, shape mismatch) or
        VmemUnsupported (architecture or feature the model lacks), naming what it is. Reads only local files."""
        from vmem.engine.loader import load_model
        return load_model(path, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, slots: torch.Tensor, cache_seqlens: torch.Tensor, *,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, S] int64 (S new tokens per sequence); slots, cache_seqlens [B] int32 (cache rows and
        tokens already cached). Returns logits [B, S, vocab] float32, or [B, 1, vocab] of the last token
        with last_only (what sampling needs: a prefill chunk then skips the lm_head over its other tokens).

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
        return self._logits(x[:, -1:] if last_only else x)

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
        """cos, sin [B, S, 1, D] (float32) for NeoX-style rotation (halves), computed per call as Hugging
        Face computes them (float32 position x inv_freq), so fp32 logits match it bit for bit there."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
        return emb.cos(), emb.sin()

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


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] float32, as transformers' modeling_rope_utils computes them
    (default, linear, llama3), in float32 like it, so the rotary angles agree exactly."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.rope_type == "linear":
        return inv_freq / rs.factor
    # llama3: keep short wavelengths, stretch long ones by factor, interpolate in between
    low_freq_wavelen = rs.original_max_position / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by position (computed in float32, returned in x's dtype)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

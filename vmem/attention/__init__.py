"""Attention entry points over KV caches (see docs/structure.md, "attention").

flash_attn_with_kvcache      contiguous caches (vmem, static): the real FlashAttention kernel on CUDA
                             when installed, an SDPA reference over zero-copy views elsewhere
paged_attention_with_kvcache block-table gather reference for the paged baseline
naive_attention              float32 oracle for tests
"""
from vmem.attention.kvcache import (
    flash_attn_available, flash_attn_with_kvcache, reference_flash_attn_with_kvcache,
)
from vmem.attention.naive import naive_attention
from vmem.attention.paged import paged_attention_with_kvcache

__all__ = ["flash_attn_available", "flash_attn_with_kvcache", "naive_attention", "paged_attention_with_kvcache",
           "reference_flash_attn_with_kvcache"]

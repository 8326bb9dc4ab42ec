"""Hypothesis state machine over the host backend: the native table, the mapping estimate and the
kernel's own view (/proc/self/maps, memfd blocks) agree after every step."""
import os

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import vmas_in

NUM_VIRT, NUM_PHYS, PB = 48, 32, 4096


class HostBackendMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        from vmem.backends import get_backend

        self.backend = get_backend("host")
        self.r = self.backend.reserve(NUM_VIRT * PB, PB)
        self.p = self.backend.create_pool(PB, NUM_PHYS)
        self.model = {}          # virt -> phys
        self.backed = set()

    def teardown(self):
        self.r.close()
        self.p.close()

    @rule(data=st.data())
    def map_batch(self, data):
        free_virt = [v for v in range(NUM_VIRT) if v not in self.model]
        if not free_virt:
            return
        virt = data.draw(st.lists(st.sampled_from(free_virt), min_size=1, max_size=8, unique=True))
        if data.draw(st.booleans()):  # a physically contiguous extent, or scattered pages
            start = data.draw(st.integers(0, NUM_PHYS - len(virt)))
            phys = list(range(start, start + len(virt)))
        else:
            phys = data.draw(st.lists(st.integers(0, NUM_PHYS - 1), min_size=len(virt), max_size=len(virt)))
        fault = data.draw(st.integers(0, 3))
        if fault:
            self.r.inject_fault(fault)
        try:
            self.r.map(virt, self.p, phys)
        except Exception as e:
            assert fault and "injected" in str(e)
            self.r.inject_fault(0)
            return
        self.r.inject_fault(0)
        self.model.update(zip(virt, phys))
        self.backed.update(phys)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def unmap_batch(self, data):
        virt = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=8, unique=True))
        self.r.unmap(virt)
        for v in virt:
            del self.model[v]

    @rule(data=st.data())
    def trim(self, data):
        unmapped = sorted(set(range(NUM_PHYS)) - set(self.model.values()))
        if unmapped:
            phys = data.draw(st.lists(st.sampled_from(unmapped), max_size=6, unique=True))
            self.p.trim(phys)
            self.backed.difference_update(phys)

    @invariant()
    def table_matches_model(self):
        if not hasattr(self, "r"):
            return
        expected = np.full(NUM_VIRT, -1)
        for v, ph in self.model.items():
            expected[v] = ph
        np.testing.assert_array_equal(self.r.mapping(), expected)
        info = self.p.info()
        assert info["mappings"] == len(self.model)
        assert info["mapped_pages"] == len(set(self.model.values()))

    @invariant()
    def mapping_estimate_is_what_the_kernel_has(self):
        if hasattr(self, "r"):
            assert self.r.num_mappings == vmas_in(self.r)

    @invariant()
    def pool_accounting_is_what_the_os_has(self):
        if hasattr(self, "p"):
            info = self.p.info()
            assert info["backed_pages"] == len(self.backed)
            assert info["resident_bytes"] == len(self.backed) * PB


# /proc/self/maps of a process with torch loaded is long; keep the run to a few seconds
_SOAK = os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci"
HostBackendMachine.TestCase.settings = settings(
    max_examples=settings.default.max_examples if _SOAK else 20, stateful_step_count=50 if _SOAK else 25)
TestHostBackendMachine = HostBackendMachine.TestCase

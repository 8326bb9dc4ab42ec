"""Reference engine: model and tokenizer here; the engine, scheduler and workloads load lazily
(importing vmem.engine must not pull in the allocator). The server is vmem.server."""
from __future__ import annotations

import importlib

from vmem.engine.model import PRESETS, Model, ModelConfig
from vmem.engine.tokenizer import ByteTokenizer

_LAZY = {
    "Engine": "vmem.engine.engine", "Request": "vmem.engine.engine", "RequestOutput": "vmem.engine.engine",
    "SamplingParams": "vmem.engine.engine", "build_engine": "vmem.engine.engine",
    "Scheduler": "vmem.engine.scheduler",
}

__all__ = ["PRESETS", "ByteTokenizer", "Model", "ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError("module 'vmem.engine' has no attribute %r" % name)

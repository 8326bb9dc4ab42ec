"""Test-only stand-in for torchvision (integrations/test_env.sh puts it on PYTHONPATH for SGLang).

SGLang 0.5.23 imports torchvision.transforms at import time (sglang.srt.configs -> internvl_utils); the
CPU torch build has no matching torchvision wheel. Nothing in the KV-cache classes calls into it: every
attribute is an empty module or a placeholder class.
"""

import sys
import types

__version__ = "0.28.0"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return "%s.%s" % (cls.__name__, name)      # enum-like members (InterpolationMode.NEAREST_EXACT)


class _Placeholder(metaclass=_PlaceholderMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision stub: not available in the vmem integration environment")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            return _Placeholder
        sub = _StubModule("%s.%s" % (self.__name__, name))
        sub.__path__ = []
        sys.modules[sub.__name__] = sub
        setattr(self, name, sub)
        return sub


sys.modules[__name__].__class__ = _StubModule
__path__ = __path__  # noqa: PLW0127  (a package, so `import torchvision.x` goes through the finder below)


class _Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.startswith("torchvision."):
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, _Loader(), is_package=True)
        return None


class _Loader:
    @staticmethod
    def create_module(spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    @staticmethod
    def exec_module(module):
        pass


sys.meta_path.append(_Finder())

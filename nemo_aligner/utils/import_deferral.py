"""Start-up: import-time work of dependencies that a run may never use, deferred to its first use.

Measured with ``python -X importtime examples/nlp/gpt/train_gpt_dpo.py --help`` (docs/performance.md):

* megatron-core decorates its fused kernels with ``megatron.core.jit.jit_fuser``, which is ``torch.compile``:
  decorating imports TorchDynamo and Inductor (1.3-1.9 s) although the local layer spec on a CPU never calls
  those kernels. Here ``jit_fuser`` compiles each kernel on its first call instead (the same compiled function
  from then on).
* megatron-core's inference context and timers import ``wandb`` when it is installed (0.5-0.9 s), to log
  metrics a training run never logs there. ``import wandb`` gives a stand-in module that imports the real one on
  its first attribute access (e.g. when ``exp_manager.create_wandb_logger=true`` builds the logger) and forwards to
  it. (``importlib.util.LazyLoader`` does not do: Python 3.11's import system reads the module's ``__spec__`` on
  every later ``import wandb``, which loads it.)

:func:`install` runs when ``nemo_aligner`` is imported, before anything imports megatron-core.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable

LAZY_MODULES = ("wandb",)
JIT_MODULE = "megatron.core.jit"


def compile_on_first_call(compile_fn: Callable) -> Callable:
    """A decorator like ``compile_fn`` (``torch.compile``, ``torch.jit.script``) that compiles on the first call."""

    def decorator(fn: Callable) -> Callable:
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(fn)
            return compiled(*args, **kwargs)

        return call

    return decorator


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds :data:`LAZY_MODULES` and :data:`JIT_MODULE` with the other finders, then defers their work."""

    def __init__(self) -> None:
        self.loading: set[str] = set()  # lazy modules being imported for real

    def find_spec(self, name, path, target=None):
        if name in self.loading or (name not in LAZY_MODULES and name != JIT_MODULE):
            return None
        spec = _find_with_others(self, name, path, target)
        if spec is None or spec.loader is None:
            return spec
        if name == JIT_MODULE:
            spec.loader = _DeferJitFuser(spec.loader)
            return spec
        return importlib.machinery.ModuleSpec(name, _StandInLoader(self))


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, finder: _DeferringFinder):
        self.finder = finder

    def create_module(self, spec):
        return _StandIn(spec.name, self.finder)

    def exec_module(self, module):
        pass


class _StandIn(types.ModuleType):
    """A module imported on its first attribute access; every access is then forwarded to it."""

    def __init__(self, name: str, finder: _DeferringFinder):
        super().__init__(name)
        self._finder = finder

    def __getattr__(self, attr):
        name = self.__name__
        if name not in sys.modules:  # the import system setting the stand-in up
            raise AttributeError(attr)
        if sys.modules[name] is self:
            del sys.modules[name]
            self._finder.loading.add(name)
            try:
                importlib.import_module(name)
            except BaseException:
                sys.modules.setdefault(name, self)
                raise
            finally:
                self._finder.loading.discard(name)
        return getattr(sys.modules[name], attr)


class _DeferJitFuser(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        fuser = getattr(module, "jit_fuser", None)
        if fuser is not None and fuser is not getattr(module, "noop_decorator", None):
            module.jit_fuser = compile_on_first_call(fuser)


def _find_with_others(skip, name, path, target):
    for finder in sys.meta_path:
        if finder is skip or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, path, target)
        if spec is not None:
            return spec
    return None


def install() -> None:
    """Defer the work above for modules not imported yet (idempotent)."""
    if any(isinstance(finder, _DeferringFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferringFinder())

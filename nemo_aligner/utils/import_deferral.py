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
* Lightning imports ``torchmetrics`` to read its version and its ``Metric`` and ``MetricCollection`` classes, and
  torchmetrics' ``__init__`` imports all its metrics, with ``scipy.signal`` and ``transformers`` (2.1 CPU-s and
  130 MB of RSS, more than Lightning itself). ``import torchmetrics`` here sets up the package with the modules
  of those two classes only (:class:`_PartialPackage`); the first access to any other name of the package runs
  its real ``__init__`` in the same module object, so ``torchmetrics.Accuracy`` and ``from torchmetrics import
  ...`` work as before (and should the partial set-up ever fail, e.g. with another torchmetrics layout, the real
  ``__init__`` runs at once).

:func:`install` runs when ``nemo_aligner`` is imported, before anything imports megatron-core.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from collections.abc import Callable

LAZY_MODULES = ("wandb",)
JIT_MODULE = "megatron.core.jit"
# A package whose __init__ waits for the first use of a name it defines beyond these (modules imported first).
PARTIAL_PACKAGES = {"torchmetrics": ("torchmetrics.utilities", "torchmetrics.metric", "torchmetrics.collections")}
PARTIAL_NAMES = {"torchmetrics": {"Metric": "torchmetrics.metric", "MetricCollection": "torchmetrics.collections"}}


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
        if name.partition(".")[0] in LAZY_MODULES and name in sys.modules:
            # ``import wandb.x`` with the stand-in as parent: reading its ``__path__`` ran the real ``__init__``,
            # which imported ``wandb.x`` already; the import system would execute it a second time.
            return importlib.machinery.ModuleSpec(name, _AlreadyImported(sys.modules[name]))
        if name in self.loading or (name not in LAZY_MODULES and name != JIT_MODULE and name not in PARTIAL_PACKAGES):
            return None
        spec = _find_with_others(self, name, path, target)
        if spec is None or spec.loader is None:
            return spec
        if name == JIT_MODULE:
            spec.loader = _DeferJitFuser(spec.loader)
            return spec
        if name in PARTIAL_PACKAGES:
            spec.loader = _PartialPackage(spec.loader)
            return spec
        return importlib.machinery.ModuleSpec(name, _StandInLoader(self), origin=spec.origin)


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, finder: _DeferringFinder):
        self.finder = finder

    def create_module(self, spec):
        return _StandIn(spec.name, self.finder, spec.origin)

    def exec_module(self, module):
        pass


class _AlreadyImported(importlib.abc.Loader):
    """Hands the import system a module that is already imported (its own ``__spec__`` kept)."""

    def __init__(self, module: types.ModuleType):
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec


class _StandIn(types.ModuleType):
    """A module imported on its first attribute access; every access is then forwarded to it."""

    def __init__(self, name: str, finder: _DeferringFinder, origin: str | None):
        super().__init__(name)
        self._finder = finder
        if origin:  # inspect.getmodule reads every module's __file__ (torch.library does, at import)
            self.__file__ = origin

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


class _PartialPackage(importlib.abc.Loader):
    """Executes a package's ``__init__`` in two parts: at import, what :data:`PARTIAL_NAMES` needs; on the first
    access to another name (PEP 562 ``__getattr__``), the real ``__init__``."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        name = module.__name__
        module.__getattr__ = functools.partial(_complete_package, self.loader, module)
        try:
            _PRELUDES[name](module)
            for submodule in PARTIAL_PACKAGES[name]:
                importlib.import_module(submodule)
            for attr, submodule in PARTIAL_NAMES[name].items():
                setattr(module, attr, getattr(sys.modules[submodule], attr))
        except Exception:  # another layout of the package: import it whole, as without this module
            for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
                del sys.modules[loaded]
            _complete_package(self.loader, module, None, force=True)


def _complete_package(loader, module: types.ModuleType, attr: str | None, force: bool = False):
    """Run the real ``__init__`` of ``module`` (once, or again with ``force``), then return its ``attr``."""
    if module.__dict__.pop("__getattr__", None) is not None or force:
        for handler in module.__dict__.pop("_deferred_log_handlers", ()):
            logging.getLogger(module.__name__).removeHandler(handler)  # the real __init__ adds its own
        loader.exec_module(module)
    if attr is None:
        return None
    try:
        return module.__dict__[attr]
    except KeyError:
        raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}") from None


def _torchmetrics_prelude(module: types.ModuleType) -> None:
    """What torchmetrics' modules read from the package before its metrics are imported (torchmetrics 1.x
    ``__init__``: the version, the logger, the root paths)."""
    about = importlib.import_module("torchmetrics.__about__")
    module.__dict__.update({k: getattr(about, k) for k in about.__all__})
    logger = logging.getLogger("torchmetrics")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    module._logger = logger
    module._deferred_log_handlers = [handler]
    module._PACKAGE_ROOT = os.path.dirname(module.__file__)
    module._PROJECT_ROOT = os.path.dirname(module._PACKAGE_ROOT)


_PRELUDES = {"torchmetrics": _torchmetrics_prelude}


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

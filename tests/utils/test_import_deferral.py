"""Start-up: megatron-core's ``torch.compile`` decorations compile on first call, wandb loads on first use,
torchmetrics' metrics load on first use (Lightning gets its real ``Metric`` classes at once), and the start-up
events a benchmark reads are written once per event."""

from __future__ import annotations

import subprocess
import sys

from nemo_aligner.utils import timers
from nemo_aligner.utils.import_deferral import compile_on_first_call


def test_compile_on_first_call_compiles_once_when_first_called():
    compiled_fns = []

    def fake_compile(fn):
        compiled_fns.append(fn)
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    @compile_on_first_call(fake_compile)
    def add(a, b=1):
        return a + b

    assert compiled_fns == []  # decorating compiles nothing
    assert add(2, b=3) == ("compiled", 5)
    assert add(4) == ("compiled", 5)
    assert len(compiled_fns) == 1 and add.__name__ == "add"


def test_importing_megatron_core_compiles_nothing_and_leaves_wandb_unloaded():
    code = (
        "import sys, nemo_aligner, megatron.core, megatron.core.inference.contexts\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
        "print(jit.jit_fuser.__qualname__.split('.')[0], hasattr(bias_gelu, '__wrapped__'),\n"
        "      'torch._inductor.compile_fx' in sys.modules, 'wandb.sdk' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["compile_on_first_call", "True", "False", "False"]


def test_lightning_gets_torchmetrics_classes_and_the_rest_loads_on_first_use():
    code = (
        "import inspect, logging, sys, nemo_aligner, lightning.pytorch, torchmetrics\n"
        "from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric\n"
        "from torchmetrics.metric import Metric\n"
        "inspect.getmodule(inspect)  # reads every module's __file__: loads nothing\n"
        "print(torchmetrics.__version__ == torchmetrics.__about__.__version__, torchmetrics.Metric is Metric,\n"
        "      issubclass(_ResultMetric, Metric), [m for m in ('scipy.signal', 'transformers', 'wandb.sdk',\n"
        "      'torchmetrics.functional') if m in sys.modules])\n"
        "from torchmetrics import Accuracy\n"
        "print(isinstance(Accuracy(task='binary'), torchmetrics.Metric), torchmetrics.functional.accuracy.__name__,\n"
        "      torchmetrics.MetricCollection is torchmetrics.collections.MetricCollection,\n"
        "      len(logging.getLogger('torchmetrics').handlers), hasattr(torchmetrics, 'NoSuchMetric'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["True True True []", "True accuracy True 1 False"]


def test_events_are_written_once_with_time_and_peak_memory(tmp_path, monkeypatch):
    path = tmp_path / "events"
    monkeypatch.setenv(timers.EVENTS_FILE_ENV, str(path))
    monkeypatch.setattr(timers, "_marked", set())
    for event in ("first_step", "first_step", "reference_pass"):
        timers.mark_event(event)
    lines = [line.split() for line in path.read_text().splitlines()]
    assert [line[0] for line in lines] == ["first_step", "reference_pass"]
    assert all(float(line[1]) > 1.7e9 and float(line[2]) > 0 for line in lines)


def test_a_submodule_import_through_the_wandb_stand_in_imports_each_module_once():
    code = (
        "import sys, nemo_aligner, wandb\n"
        "stand_in = type(sys.modules['wandb']).__name__\n"
        "from wandb.sdk.lib import filesystem  # the stand-in is the parent: loads the real wandb first\n"
        "import wandb.sdk\n"
        "print(stand_in, wandb.sdk is sys.modules['wandb.sdk'], hasattr(wandb.sdk, 'data_types'),\n"
        "      filesystem is sys.modules['wandb.sdk.lib.filesystem'], type(wandb.sdk.__spec__.loader).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["_StandIn", "True", "True", "True", "SourceFileLoader"]

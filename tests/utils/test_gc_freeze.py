"""The entry scripts' garbage-collector handling (``hydra_runner``, ``freeze_long_lived_objects``): paused while
they import, back on with the imports frozen once the run starts, the run's long-lived objects frozen in a
single-run process, nothing frozen in-process or in a Hydra multirun job (the next job reuses the process), and
everything unfrozen again for a caller that goes on after the script (a test harness)."""

from __future__ import annotations

import gc
import json
import runpy
import subprocess
import sys
from pathlib import Path

from nemo_aligner.utils import config

REPO = Path(__file__).resolve().parents[2]

# An entry script shaped like examples/nlp/gpt/train_gpt_*.py: it records the collector's state at the task's
# start and after the freeze a recipe does before its training loop.
SCRIPT = """
import gc

if __name__ == "__main__":
    gc.disable()

import json, sys
from omegaconf import DictConfig
from nemo_aligner.utils.config import freeze_long_lived_objects, hydra_runner


@hydra_runner(config_path="conf", config_name="job")
def main(cfg: DictConfig) -> None:
    start = gc.get_freeze_count()
    freeze_long_lived_objects()
    garbage = []  # more objects, so a freeze has something new to freeze
    garbage.append(garbage)
    print(json.dumps({"enabled": gc.isenabled(), "frozen_at_start": start, "after": gc.get_freeze_count()}))


if __name__ == "__main__":
    main()
"""


def _run(tmp_path: Path, *args: str) -> list[dict]:
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "job.yaml").write_text("x: 1\n")
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_a_command_line_run_collects_again_with_its_imports_and_setup_frozen(tmp_path):
    (job,) = _run(tmp_path)
    assert job["enabled"], "the entry script's gc.disable() must end when the run starts"
    assert job["frozen_at_start"] > 10_000  # the imports (torch, omegaconf, hydra, ...)
    assert job["after"] > job["frozen_at_start"]  # the recipe's freeze before the loop took the newer objects


def test_multirun_jobs_freeze_nothing_after_the_imports(tmp_path):
    jobs = _run(tmp_path, "-m", "x=1,2")
    assert len(jobs) == 2
    assert all(job["enabled"] and job["after"] == job["frozen_at_start"] for job in jobs)
    assert jobs[0]["frozen_at_start"] == jobs[1]["frozen_at_start"]  # job 1's objects were not frozen for job 2


def test_in_process_runs_freeze_nothing():
    before = gc.get_freeze_count()
    config.freeze_long_lived_objects()
    assert gc.get_freeze_count() == before == 0


def test_a_harness_running_the_script_in_process_gets_its_collector_back(tmp_path, monkeypatch, capsys):
    # tests/docs/doc_commands.py runs the entry scripts this way (runpy, sys.argv patched).
    _run(tmp_path)  # writes the script and its config
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "entry.py"), f"hydra.run.dir={tmp_path / 'run'}"])
    runpy.run_path(str(tmp_path / "entry.py"), run_name="__main__")
    job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert job["after"] > job["frozen_at_start"] > 0  # frozen while it ran
    assert gc.isenabled() and gc.get_freeze_count() == 0 and not config._process_ends_with_run

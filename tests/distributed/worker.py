"""Entry point of one rank started by :func:`tests.distributed.multiprocess.run_distributed`."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    target, kwargs_json, out_dir = sys.argv[1:4]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(kwargs_json))
    torch.save(result, Path(out_dir) / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

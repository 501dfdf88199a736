"""Name every weight whose stored shape differs from the one a model expects, before megatron-core loads it."""

from __future__ import annotations

from pathlib import Path

from nemo_aligner.checkpoint import nemo_file


def check_stored_shapes(sharded_state_dict: dict, weights_dir: Path) -> None:
    """Compare the global shapes the model expects with those stored, and name every mismatch.

    megatron-core's loader fails on a mismatch with an unrelated assertion; this check runs first.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    stored = nemo_file.read_dcp_metadata(weights_dir).state_dict_metadata
    apply_factories(sharded_state_dict)
    problems = []
    for sharded in nested_values(sharded_state_dict):
        if not isinstance(sharded, ShardedTensor):
            continue
        if sharded.key not in stored:
            problems.append(f"{sharded.key}: expected by the config, absent from the checkpoint")
        elif (found := tuple(stored[sharded.key].size)) != (needed := tuple(sharded.global_shape)):
            problems.append(f"{sharded.key}: checkpoint has {found}, config needs {needed}")
    if problems:
        raise nemo_file.NemoFormatError(
            f"{weights_dir}: the stored weights do not fit the model built from its config "
            f"(architecture or shape mismatch):\n  " + "\n  ".join(sorted(set(problems)))
        )

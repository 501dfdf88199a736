"""nemo_aligner: LLM alignment (SFT, DPO and variants, SPIN, Self-Rewarding) on megatron-core.

Reads and writes NeMo ``.nemo`` checkpoints without depending on nemo-toolkit.
"""

import warnings

# megatron-core warns at import time, once per module, that the optional GPU accelerators (apex,
# TransformerEngine) are missing and that it uses its torch fallbacks; docs/megatron_cpu.md says so once.
# torch warns that DCP's ShardedTensor (which megatron-core's checkpointing uses) is deprecated.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
# megatron-core 0.16's checkpoint loader calls torch DCP's deprecated load_state_dict on every restore.
warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
# Its TransformerConfig also warns on every model build about a CUDA-graph default we do not use.
for _message in ("Apex is not installed", "Transformer Engine and Apex are not installed", "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)

# Start-up: dependencies' import-time work that a run may never use waits for its first use (import_deferral.py).
from nemo_aligner.utils import import_deferral  # noqa: E402

import_deferral.install()

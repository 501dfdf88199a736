"""Tensor parallelism of MegatronGPTModel against one process (2 gloo ranks, one world for all checks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo
from tests.conftest import NEMO_FIXTURE_NAMES, NEMO_FIXTURES, perturb_, tiny_model_cfg
from tests.distributed.multiprocess import restore_at_layout, run_distributed

pytestmark = pytest.mark.distributed


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Concatenate the tensor-parallel vocabulary slices by hand (the check's independent path)."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def tp2_world(paths: dict[str, str], tp1_saved: str, tp2_save_path: str, input_ids: list) -> dict:
    """Runs on each of 2 ranks at TP=2: restore every file, report full logits, log-probs and a saved copy."""
    ids = torch.tensor(input_ids)
    results = {}
    for name, path in {**paths, "ours_tp1": tp1_saved}.items():
        cfg = load_and_override_model_config(path, {"tensor_model_parallel_size": 2})
        model = restore_at_layout(MegatronGPTModel, cfg, path).eval()
        assert parallel_state.get_tensor_model_parallel_world_size() == 2
        with torch.no_grad():
            local = model(ids)
            logprobs = model.get_logprobs(ids)
        results[name] = {"local_vocab": local.shape[-1], "logits": _gather_vocab(local), "logprobs": logprobs}
        if name == "ours_tp1":
            model.save_to(tp2_save_path)
    return results


def test_tp2_matches_one_process_and_reshards_checkpoints(tmp_path):
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = MegatronGPTModel(tiny_model_cfg(num_query_groups=4)).eval()
    perturb_(ours)
    ours.save_to(tmp_path / "tp1.nemo")
    with torch.no_grad():
        ours_logits = ours(ids)
    expected = {
        name: torch.load(NEMO_FIXTURES / f"{name}.expected.pt", weights_only=True) for name in NEMO_FIXTURE_NAMES
    }

    ranks = run_distributed(
        "tests.distributed.test_model_parallel:tp2_world",
        nprocs=2,
        out_dir=tmp_path / "out",
        paths={name: str(NEMO_FIXTURES / f"{name}.nemo") for name in NEMO_FIXTURE_NAMES},
        tp1_saved=str(tmp_path / "tp1.nemo"),
        tp2_save_path=str(tmp_path / "tp2.nemo"),
        input_ids=ids.tolist(),
    )
    for rank in ranks:
        # NeMo's fixtures at TP=2 (TP reduction order differs from one process: fp32 rounding, < 1e-5).
        for name in NEMO_FIXTURE_NAMES:
            result = rank[name]
            assert result["local_vocab"] * 2 == expected[name]["logits"].shape[-1]
            with torch.no_grad():
                fixture_logits = MegatronGPTModel.restore_from(NEMO_FIXTURES / f"{name}.nemo").eval()(ids)
            assert (result["logits"] - fixture_logits).abs().max().item() < 1e-5
        # Our TP=1 file at TP=2: same logits; vocab-parallel log-probs equal log_softmax of gathered logits.
        result = rank["ours_tp1"]
        assert (result["logits"] - ours_logits).abs().max().item() < 1e-5
        by_hand = torch.log_softmax(result["logits"].double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        assert (result["logprobs"].double() - by_hand).abs().max().item() < 1e-5

    # Saved at TP=2, restored at TP=1: the very same weights.
    tp1_cfg = load_and_override_model_config(tmp_path / "tp2.nemo", {"tensor_model_parallel_size": 1})
    back = load_from_nemo(MegatronGPTModel, tp1_cfg, restore_path=tmp_path / "tp2.nemo")
    for key, value in ours.model_state_dict_in_cpu().items():
        assert torch.equal(value, back.model_state_dict_in_cpu()[key]), key

"""The held-out generation evaluation at DP=2, TP=2 and PP=2 gives the metrics of one process (one 2-rank world)."""

from __future__ import annotations

import pytest

from nemo_aligner.evaluation import build_evaluator
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from tests.distributed.multiprocess import run_distributed
from tests.evaluation.common import EVALUATION, validation_prompts

pytestmark = pytest.mark.distributed

LAYOUTS = {"dp2": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def evaluation_world(model_path: str, evaluations: dict) -> dict:
    """Each rank: the model restored at every layout in turn, evaluated with each of ``evaluations``."""
    from megatron.core import parallel_state

    from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo

    results = {}
    for name, (tp, pp) in LAYOUTS.items():
        overrides = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        cfg = load_and_override_model_config(model_path, overrides)
        model = load_from_nemo(MegatronGPTModel, cfg, restore_path=model_path).eval()
        assert parallel_state.get_tensor_model_parallel_world_size() == tp
        assert parallel_state.get_pipeline_model_parallel_world_size() == pp
        for kind, evaluation in evaluations.items():
            evaluator = build_evaluator(evaluation, validation_prompts(model.tokenizer), model.tokenizer, seed=1234)
            results[kind, name] = evaluator.evaluate(model)
    return results


def test_dp2_tp2_pp2_give_the_metrics_of_one_process(tmp_path, tiny_sft_model):
    # Greedy and sampled (keyed per prompt, so the data-parallel split does not change what is drawn).
    sampled = {**EVALUATION, "sampling": {"use_greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}}
    single = {}
    model = MegatronGPTModel.restore_from(tiny_sft_model).eval()
    for kind, evaluation in (("greedy", EVALUATION), ("sampled", sampled)):
        evaluator = build_evaluator(evaluation, validation_prompts(model.tokenizer), model.tokenizer, seed=1234)
        single[kind] = evaluator.evaluate(model)
    assert 0.0 < single["greedy"]["exact_match"] < 1.0

    ranks = run_distributed(
        "tests.distributed.test_evaluation_parallel:evaluation_world",
        nprocs=2,
        out_dir=tmp_path / "out",
        model_path=str(tiny_sft_model),
        evaluations={"greedy": EVALUATION, "sampled": sampled},
    )
    for rank in ranks:
        for kind in single:
            for name in LAYOUTS:
                assert rank[kind, name] == pytest.approx(single[kind]), (kind, name)

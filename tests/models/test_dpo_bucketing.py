"""Length-bucketed DPO micro batches: the same per-pair log-probs and losses as scoring each pair alone / as one
unsorted micro batch, with less padding computed."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.utils.batching import length_bucketed_micro_batches
from tests.conftest import perturb_, tiny_model_cfg

# (prompt length, chosen response length, rejected response length): lengths deliberately out of order.
SHAPES = [(20, 9, 3), (4, 2, 2), (11, 30, 6), (3, 1, 4), (8, 8, 8), (15, 2, 12)]
PAD = 0


def test_micro_batches_are_sorted_and_trimmed():
    from nemo_aligner.utils.distributed import initialize_distributed

    initialize_distributed()
    lengths = torch.tensor([5, 2, 7, 2, 3, 6])
    tokens = torch.stack([torch.cat([torch.arange(1, n + 1), torch.zeros(7 - n, dtype=torch.long)]) for n in lengths])
    batch = {"tokens": tokens, "id": torch.arange(6)}
    micro, order = length_bucketed_micro_batches(batch, 2, lengths, ["tokens"], multiple_of=4)
    assert order.tolist() == [1, 3, 4, 0, 5, 2]  # stable: the two samples of length 2 keep their order
    assert [m["id"].tolist() for m in micro] == [[1, 3], [4, 0], [5, 2]]
    assert [m["tokens"].shape[1] for m in micro] == [4, 7, 7]  # 2 -> 4; 5 -> 8 capped at the batch width 7
    for m in micro:
        assert torch.equal(m["tokens"], tokens[m["id"], : m["tokens"].shape[1]])


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = tiny_model_cfg(micro_batch_size=2, global_batch_size=6, dpo={"ref_policy_kl_penalty": 0.5})
    model = MegatronGPTDPOModel(cfg).eval()
    perturb_(model)
    generator = torch.Generator().manual_seed(0)
    items = []
    for index, (prompt, chosen, rejected) in enumerate(SHAPES):
        ids = torch.randint(1, 250, (prompt + max(chosen, rejected) * 2,), generator=generator)
        items.append(
            {
                "chosen_ids": ids[: prompt + chosen],
                "rejected_ids": torch.cat([ids[:prompt], ids[-rejected:]]),
                "prompt_length": prompt,
                "chosen_length": prompt + chosen,
                "rejected_length": prompt + rejected,
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
                "sample_index": index,
            }
        )
    return model, items, DPOCollate(PAD)(items)


def test_logprob_sums_equal_each_pair_scored_alone(model_and_batch):
    model, items, batch = model_and_batch
    chosen, rejected = model.get_logprob_sums(batch)
    with torch.no_grad():
        for n, item in enumerate(items):
            for side, values in (("chosen", chosen), ("rejected", rejected)):
                ids = item[f"{side}_ids"][None]
                alone = model.get_logprobs(ids)[0, item["prompt_length"] - 1 :].sum()
                # float32 sums of up to 30 log-probs of size ~6: rounding is ~1e-7 relative
                assert float(values[n]) == pytest.approx(float(alone), rel=1e-6), (n, side)


def test_loss_and_metrics_equal_one_unsorted_micro_batch(model_and_batch):
    model, _, batch = model_and_batch
    ref_chosen, ref_rejected = model.get_logprob_sums(batch)
    batch = {**batch, "ref_chosen_logps": ref_chosen - 0.3, "ref_rejected_logps": ref_rejected + 0.2}
    results = {}
    for micro_batch_size in (2, 6):  # three sorted, trimmed micro batches / the whole batch at its full width
        with open_dict(model.cfg):
            model.cfg.micro_batch_size = micro_batch_size
        results[micro_batch_size] = model.get_loss_and_metrics(batch, forward_only=True)[1]
    assert results[2].keys() == results[6].keys()
    for key, value in results[6].items():
        # Other widths (trimmed to multiples of 16) sum in another order: fp32 rounding, relative 1e-5 at most.
        assert results[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert results[6]["loss"] > 0.01

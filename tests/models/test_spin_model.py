"""MegatronGPTSPINModel: SPIN loss and masks by hand, KL schedule, the reference in checkpoints, Adam offload."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nemo_aligner.algorithms.spin import spin_custom_collate
from nemo_aligner.checkpoint.trainer_checkpoint import load_checkpoint, save_checkpoint
from nemo_aligner.data.nlp.builders import build_sft_dataset
from nemo_aligner.data.nlp.pairs import SPINPairsDataset
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import REFERENCE_PREFIX, MegatronGPTSPINModel
from nemo_aligner.utils.utils import retrieve_model_state_dict_in_cpu
from tests.conftest import perturb_, tiny_model_cfg

SPECIALS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
SPIN = {"ref_policy_kl_penalty": 0.5, "preference_loss": "dpo", "offload_adam_states": True}
OPTIM = {"name": "adamw", "lr": 1e-3, "sched": {"name": "Constant"}}


def spin_model(**spin) -> MegatronGPTSPINModel:
    cfg = tiny_model_cfg(
        micro_batch_size=2,
        global_batch_size=2,
        tokenizer={"library": "byte-level", "special_tokens": SPECIALS},
        spin={**SPIN, **spin},
    )
    return MegatronGPTSPINModel(cfg)


def chat(question: str, answer: str) -> str:
    return json.dumps(
        {
            "system": "",
            "mask": "User",
            "conversations": [{"from": "User", "value": question}, {"from": "Assistant", "value": answer}],
        }
    )


@pytest.fixture()
def two_pairs(tmp_path):
    """Two prompts with ground truth; generated: one different response (valid), one equal to the truth (masked)."""
    model = spin_model()
    path = tmp_path / "chat.jsonl"
    path.write_text(chat("add 1 and 2", "3") + "\n" + chat("reverse: abc", "cba") + "\n")
    data_cfg = {"chat": True}
    split_cfg = {"file_path": str(path), "max_seq_length": 64}
    sft = build_sft_dataset(data_cfg, split_cfg, model.tokenizer, seed=0)
    pairs = SPINPairsDataset(sft, model.tokenizer.eos_id)
    tok = model.tokenizer
    end = tok.text_to_ids("\n<extra_id_1>")
    pairs.generated = {0: (tok.text_to_ids("4") + end, True), 1: (list(sft.prompt_and_answer(1)[1]), False)}
    batch = spin_custom_collate([pairs[0], pairs[1]], tok.eos_id)
    return model, sft, batch


def test_masks_score_exactly_the_response_tokens_including_the_end(two_pairs):
    model, sft, batch = two_pairs
    tok = model.tokenizer
    for row in range(2):
        prompt, actual = sft.prompt_and_answer(row)
        # The ground truth is the answer, then the end of turn "\n" and the next turn's "<extra_id_1>" (one id).
        assert tok.ids_to_text(list(actual)).startswith(["3", "cba"][row])
        assert list(actual[-2:]) == [10, tok.token_to_id("<extra_id_1>")]
        chosen = batch["chosen_mask"][row].nonzero().flatten().tolist()
        assert chosen == list(range(len(prompt), len(prompt) + len(actual)))
        assert batch["chosen"][row, len(prompt) : len(prompt) + len(actual)].tolist() == list(actual)
    assert batch["valid"].tolist() == [1.0, 0.0]  # the second generation equals the ground truth: no signal


def test_spin_loss_by_hand(two_pairs):
    model, _, batch = two_pairs
    model.eval()
    ref_chosen, ref_rejected = model.get_logprob_sums(batch)  # the reference: the weights before training
    perturb_(model, seed=5)  # the policy has moved away from the reference
    with torch.no_grad():
        loss, metrics = model.get_loss_and_metrics(
            {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}, forward_only=True
        )

    def response_logp(tokens, mask):
        logits = model(tokens).double()
        logp = F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        return (logp * mask[:, 1:]).sum(-1)

    with torch.no_grad():
        h = (response_logp(batch["chosen"], batch["chosen_mask"]) - ref_chosen.double()) - (
            response_logp(batch["rejected"], batch["rejected_mask"]) - ref_rejected.double()
        )
    expected = -F.logsigmoid(0.5 * h[0])  # only the first pair is valid
    assert metrics["num_pairs"] == 1
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["rewards_actual_mean"] == pytest.approx(
        (response_logp(batch["chosen"], batch["chosen_mask"])[0] - ref_chosen[0]).item(),
        abs=1e-5,  # unscaled
    )


def test_kl_penalty_per_iteration():
    model = spin_model(ref_policy_kl_penalty=[0.1, 1.0, 5.0])
    assert [model.set_KL_penalty_by_iteration(t) or model.ref_policy_kl_penalty for t in range(3)] == [0.1, 1.0, 5.0]
    with pytest.raises(ValueError, match="ref_policy_kl_penalty has 3 values"):
        model.set_KL_penalty_by_iteration(3)


def test_reference_weights_travel_in_trainer_checkpoints(tmp_path, two_pairs):
    model, _, batch = two_pairs
    model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(model)
    reference = {k: v.clone() for k, v in model.ref_policy_state_dict.items()}
    perturb_(model, seed=7)  # training moved the policy; the reference stays
    assert REFERENCE_PREFIX in model.sharded_state_dict()
    per_token = model.get_ref_policy_logprobs(batch)
    assert per_token.shape == (4, batch["chosen"].shape[1] - 1)
    save_checkpoint(tmp_path, "ckpt", {"model": model.sharded_state_dict()}, {"step": 1})

    fresh = spin_model()
    fresh.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(fresh)
    state, _ = load_checkpoint(tmp_path / "ckpt", {"model": fresh.sharded_state_dict()})
    fresh.load_model_state_dict(state["model"])
    for name, value in reference.items():
        assert torch.equal(fresh.ref_policy_state_dict[name], value), name
    assert torch.equal(fresh.get_ref_policy_logprobs(batch), per_token)


def test_adam_offload_releases_storage_and_restores_bit_exactly(two_pairs):
    model, _, batch = two_pairs
    twin = spin_model()
    results = []
    for m, offload in ((model, True), (twin, False)):
        optimizer, _ = m.setup_optimization(OPTIM, max_steps=4)
        ref = m.get_logprob_sums(batch)
        for step in range(2):
            m.prepare_for_training_step()
            m.get_loss_and_metrics({**batch, "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}, False)
            optimizer.step()
            if offload and step == 0:
                states = [t for s in optimizer.optimizer.state.values() for t in s.values() if t.dim() > 0]
                before = [t.clone() for t in states]
                m.offload_adam_states()
                assert all(t.numel() == 0 for t in states)  # the moments' storage is released
                m.onload_adam_states()
                assert all(torch.equal(a, b) for a, b in zip(states, before))
        results.append(m.model_state_dict_in_cpu())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key

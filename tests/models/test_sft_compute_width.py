"""SFT batches computed at widths rounded up to 16 tokens (``gpt_sft_model._at_compute_width``): the padding changes
no loss, and the width never passes the model's sequence length."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel, _at_compute_width, _width_multiple
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import forward_tokens
from nemo_aligner.utils.distributed import initialize_distributed
from tests.conftest import perturb_, tiny_model_cfg


@pytest.mark.parametrize(
    ("width", "max_length", "expected"), [(37, 1024, 48), (48, 1024, 48), (37, 40, 40), (50, 40, 50)]
)
def test_widths_round_up_to_16_within_the_sequence_length(width, max_length, expected):
    batch = {"input_ids": torch.arange(1, 2 * width + 1).view(2, width), "loss_mask": torch.ones(2, width), "n": 3}
    out = _at_compute_width(batch, _width_multiple(tiny_model_cfg()), max_length)
    assert out["input_ids"].shape == out["loss_mask"].shape == (2, expected)
    assert torch.equal(out["input_ids"][:, :width], batch["input_ids"]) and out["n"] == 3
    assert not out["loss_mask"][:, width:].any()  # the padding is never scored


def test_the_datas_own_multiple_wins():
    # e.g. pad_length_to_multiple_of=12 for sequence parallelism at TP 3: a width of 24 must stay divisible by 3.
    cfg = tiny_model_cfg(data={"train_ds": {"pad_length_to_multiple_of": 12}})
    batch = {"input_ids": torch.ones(2, 24, dtype=torch.long), "loss_mask": torch.ones(2, 24)}
    assert _width_multiple(cfg) == 12
    assert _at_compute_width(batch, _width_multiple(cfg), 1024)["input_ids"].shape[1] == 24


def test_the_loss_is_that_of_the_unpadded_batch():
    initialize_distributed()
    torch.manual_seed(0)
    model = GPTSFTModel(tiny_model_cfg(micro_batch_size=2, global_batch_size=2)).eval()
    perturb_(model)
    input_ids = torch.randint(1, 250, (2, 21))
    loss_mask = torch.zeros(2, 21)
    loss_mask[0, 5:21] = 1
    loss_mask[1, 9:14] = 1
    loss, metrics = model.get_loss_and_metrics({"input_ids": input_ids, "loss_mask": loss_mask}, forward_only=True)
    # Independent: log-softmax of the unpadded forward, next-token targets, the scored positions only.
    with torch.no_grad():
        logits = forward_tokens(model.model, input_ids).float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    mask = loss_mask[:, 1:]
    assert metrics["num_tokens"] == mask.sum().item() == 21
    assert loss == pytest.approx((-(logprobs * mask).sum() / mask.sum()).item(), rel=1e-5)

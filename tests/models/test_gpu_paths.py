"""GPU-only paths: TransformerEngine layer spec and bf16 O2 on CUDA. Marked ``gpu``: not run on CPU machines."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from tests.conftest import NEMO_FIXTURES

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["tiny_gpt_rms_swiglu_rope_gqa", "tiny_gpt_ln_gelu_abs"])
def test_transformer_engine_spec_reproduces_nemo_logits(name):
    from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo

    path = NEMO_FIXTURES / f"{name}.nemo"
    cfg = load_and_override_model_config(path, {"transformer_engine": True})
    model = load_from_nemo(MegatronGPTModel, cfg, restore_path=path).cuda().eval()
    expected = torch.load(NEMO_FIXTURES / f"{name}.expected.pt", weights_only=True)
    with torch.no_grad():
        logits = model(expected["input_ids"].cuda(), expected["position_ids"].cuda()).float().cpu()
    assert (logits - expected["logits"]).abs().max().item() < 1e-3  # TE kernels (TF32 allowed)


def test_bf16_o2_forward_on_cuda():
    from tests.conftest import tiny_model_cfg

    model = MegatronGPTModel(tiny_model_cfg(precision="bf16", megatron_amp_O2=True)).cuda().eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 16), device="cuda"))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()

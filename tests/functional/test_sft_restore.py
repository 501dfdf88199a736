"""SFT from a .nemo: the file's architecture and tokenizer replace gpt_sft_tiny.yaml's from-scratch ones."""

from __future__ import annotations

from examples.nlp.gpt.train_gpt_sft import ARCHITECTURE_KEYS, use_checkpoint_architecture
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.train_script_utils import model_config_for_training
from nemo_aligner.utils.utils import load_checkpoint_model_config
from tests.functional.sft_runs import SCRIPTS


def test_restored_model_keeps_its_own_architecture_tokenizer_and_context(nemo_fixtures_dir):
    path = nemo_fixtures_dir / "tiny_gpt_rms_swiglu_rope_gqa.nemo"  # hidden 64, context 64: not gpt_sft_tiny.yaml's
    stored = load_checkpoint_model_config(path)
    cfg = compose_config(SCRIPTS / "conf", "gpt_sft_tiny", [f"model.restore_from_path={path}"])
    assert cfg.model.hidden_size != stored.hidden_size  # the yaml's embedded-default architecture differs

    use_checkpoint_architecture(cfg, str(path))
    model_cfg = model_config_for_training(cfg, str(path))
    for key in ARCHITECTURE_KEYS:
        assert model_cfg.get(key) == stored.get(key), key
    # Data lengths that interpolate model.encoder_seq_length follow the checkpoint's context.
    assert cfg.model.data.train_ds.max_seq_length == stored.encoder_seq_length == 64
    # Keys outside the architecture still come from the user's config.
    assert model_cfg.optim.lr == cfg.model.optim.lr

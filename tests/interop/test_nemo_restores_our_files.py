"""Real NVIDIA NeMo 2.5.0 restores every kind of `.nemo` this library writes, and computes what we compute.

Each kind of file is written here with a tiny model (HF Llama / Mistral / Qwen2 conversion through the CLI, the
final model of an SFT, DPO, SPIN and Self-Rewarding run of the entry scripts on the embedded default, a LoRA DPO
run's merged model, the legacy converter's output). NeMo's own `MegatronGPTModel.restore_from` then restores them
on the CPU in its separate venv (`nemo_venv.py`; built in the background while the files are written) and
computes logits and token ids (`nemo_side.py`). For each kind: max |logit difference| <= 1e-4 in fp32 for the same
token ids, over the whole padded vocabulary, and NeMo's tokenizer gives our ids (and eos id) for the same strings.
The measured differences are listed at the end of the run (`conftest.py`). Three more checks keep this honest: a
file whose config disagrees with its weights is seen as different, and the two tokenizers NeMo rebuilds
differently (byte-level chat markers, legacy SentencePiece without a named eos) behave as the save-time warnings
say.
"""

from __future__ import annotations

import json
import logging
import runpy
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.tokenizers import NemoTokenizerWarning
from nemo_aligner.utils.config import compose_config
from tests.conftest import NEMO_FIXTURES, captured_log, perturb_, tiny_model_cfg
from tests.cpu_fp32 import FP32
from tests.functional.test_bad_inputs import repack
from tests.interop.nemo_venv import REPO, TOOLKIT, NemoVenvBuild, run_nemo

# Slow: the NeMo venv (built once, ~2 min) and NeMo's restores keep it out of the fast subset.
pytestmark = [pytest.mark.nemo_interop, pytest.mark.slow]

LOGIT_ATOL = 1e-4
CONTROL = "legacy_converted_with_another_rotary_base"
SPM_LIST = "sentencepiece_legacy_list"
CONVERTERS = REPO / "scripts" / "checkpoint_converters"
CONF = REPO / "examples" / "nlp" / "gpt" / "conf"
STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and  double  spaces ",
    "digits 12345, punctuation!? (ok)",
    "line\nbreak\ttab",
    "café naïve résumé",
    "ﬁ ＡＢＣ",
    "日本語 😀",
    "",
]
# Our byte-level tokenizer keeps chat markers as single ids; NeMo's encodes them as bytes (docs/checkpoints.md).
BYTE_TEXT = "User<extra_id_1>Hi"
# NeMo keeps these single ids too: an HF added token, a SentencePiece legacy special token.
HF_SPECIAL_TEXT = "hello <|eot_id|> world"
SPM_SPECIAL_TEXT = "<extra_id_0>System\n<extra_id_1>User the dog<extra_id_1>"
HF_TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    dtype="float32",
)


# ------------------------------------------------------------------ writers: one per kind of file
# Qwen2's pre-tokenizer split (digits one by one), as in Qwen2's tokenizer.json.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HUB_TOKENIZER_CONFIGS = {
    "llama": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"},
    "qwen2": {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": None,
    },
}


def _write_bpe_tokenizer(directory: Path, style: str) -> None:
    """A byte-level BPE tokenizer (300 ids trained on a few sentences, plus a chat marker as an added special
    token) as a Hub model ships it: ``tokenizer.json`` with the family's pre-tokenizer (Llama-3 style, or Qwen2's
    digit-by-digit split) and the family's ``tokenizer_config.json``. (transformers 5's ``save_pretrained`` would
    name a class, TokenizersBackend, that NeMo's transformers 4 does not know.)"""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "qwen2")
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level]) if style == "qwen2" else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(STRINGS[:3] * 20 + ["the lazy dog reads the old book"] * 20, trainer)
    backend.add_special_tokens(["<|eot_id|>"])
    backend.save(str(directory / "tokenizer.json"))
    config = {**HUB_TOKENIZER_CONFIGS[style], "additional_special_tokens": ["<|eot_id|>"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _spm_model(directory: Path) -> Path:
    """The SentencePiece model of the NeMo-written fixture (200 pieces), as an HF ``tokenizer.model``."""
    with tarfile.open(NEMO_FIXTURES / "tiny_gpt_ln_gelu_abs.nemo") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("_tok.model"))
        data = tar.extractfile(member).read()
    (directory / "tokenizer.model").write_bytes(data)
    return directory / "tokenizer.model"


def write_hf_conversions(root: Path) -> dict[str, Path]:
    """HF Llama (tokenizer.json), Mistral (SentencePiece tokenizer.model) and Qwen2 (tokenizer.json, tied, q/k/v
    bias) directories converted with convert_llama_hf_to_nemo.py."""
    convert = runpy.run_path(str(CONVERTERS / "convert_llama_hf_to_nemo.py"))["main"]
    models = {
        "hf_llama": (LlamaForCausalLM, LlamaConfig, dict(vocab_size=320, rope_theta=50000.0)),
        "hf_mistral": (MistralForCausalLM, MistralConfig, dict(vocab_size=256, sliding_window=None)),
        "hf_qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(vocab_size=320, tie_word_embeddings=True)),
    }
    out = {}
    for seed, (name, (model_cls, config_cls, extra)) in enumerate(models.items()):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**HF_TINY, **extra))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        directory = root / name
        model.save_pretrained(directory)
        if name == "hf_mistral":
            _spm_model(directory)
        else:
            _write_bpe_tokenizer(directory, "qwen2" if name == "hf_qwen2" else "llama")
        convert(["--input_name_or_path", str(directory), "--output_path", str(root / f"{name}.nemo")])
        out[name] = root / f"{name}.nemo"
    return out


def _run(main_module: str, config: str, overrides: list[str]) -> None:
    main = runpy.run_path(str(REPO / "examples" / "nlp" / "gpt" / f"{main_module}.py"))["main"]
    main(compose_config(CONF, config, overrides))


def write_training_runs(root: Path) -> dict[str, Path]:
    """The final .nemo of each algorithm's entry script on the embedded default (byte-level tokenizer with chat
    markers), a few steps each; SFT from scratch, the others from the SFT result."""
    sft = root / "sft"
    _run(
        "train_gpt_sft",
        "gpt_sft_tiny",
        [
            f"exp_manager.explicit_log_dir={sft}",
            "trainer.sft.max_steps=2",
            "trainer.sft.val_check_interval=2",
            "trainer.sft.limit_val_batches=1",
            "model.data.train_ds.global_batch_size=4",
            "model.data.train_ds.micro_batch_size=2",
        ],
    )
    base = sft / "checkpoints" / "megatron_gpt_sft.nemo"
    small = ["model.global_batch_size=2", "model.micro_batch_size=1", f"pretrained_checkpoint.restore_from_path={base}"]
    small += FP32  # gpt_dpo.yaml is bf16 + megatron_amp_O2: NeMo's logits are compared in fp32
    dpo = ["trainer.dpo.max_steps=1", "trainer.dpo.val_check_interval=1", "trainer.dpo.limit_val_batches=1"]
    _run("train_gpt_dpo", "gpt_dpo", [f"exp_manager.explicit_log_dir={root / 'dpo'}", *small, *dpo])
    lora = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4", "model.optim.lr=1e-2"]
    _run("train_gpt_dpo", "gpt_dpo", [f"exp_manager.explicit_log_dir={root / 'lora'}", *small, *dpo, *lora])
    loop = ["max_iterations=1", "limit_train_batches=1", "val_check_interval=1", "limit_val_batches=1"]
    _run(
        "train_gpt_spin",
        "gpt_spin_tiny",
        [f"exp_manager.explicit_log_dir={root / 'spin'}", *small, *[f"trainer.spin.{o}" for o in loop]],
    )
    _run(
        "train_gpt_self_rewarding",
        "gpt_self_rewarding_tiny",
        [
            f"exp_manager.explicit_log_dir={root / 'self_rewarding'}",
            *small,
            *[f"trainer.self_rewarding.{o}" for o in loop],
            "model.spin.num_responses_to_gen=2",
            "model.spin.use_meta_judge=false",
        ],
    )
    return {
        "sft": base,
        "dpo": root / "dpo" / "checkpoints" / "megatron_gpt_dpo.nemo",
        "dpo_lora_merged": root / "lora" / "checkpoints" / "megatron_gpt_dpo.nemo",
        "spin": root / "spin" / "checkpoints" / "megatron_gpt_spin.nemo",
        "self_rewarding": root / "self_rewarding" / "checkpoints" / "megatron_gpt_self_rewarding.nemo",
    }


def write_legacy_conversion(root: Path) -> dict[str, Path]:
    """A legacy (pre-mcore, TP=2 ``mp_rank_XX``) GPT with a SentencePiece artifact, through
    convert_nemo_gpt_to_mcore.py (the legacy file is written as in tests/checkpoint/test_legacy_conversion.py)."""
    from tests.checkpoint.test_legacy_conversion import legacy_rank_files, legacy_state_dict, write_legacy_nemo

    artifact = "0123456789abcdef0123456789abcdef_tok.model"
    spm = _spm_model(root)
    cfg = tiny_model_cfg(
        num_query_groups=None, bias=True, tokenizer={"library": "sentencepiece", "model": f"nemo:{artifact}"}
    )
    model = MegatronGPTModel({**cfg, "tokenizer": {"library": "sentencepiece", "model": str(spm)}})
    perturb_(model, seed=7)
    legacy_cfg = dict(cfg, mcore_gpt=False, tensor_model_parallel_size=2)
    files = legacy_rank_files(legacy_state_dict(model.model_state_dict_in_cpu(), cfg), legacy_cfg, 2, 1)
    write_legacy_nemo(root / "legacy.nemo", legacy_cfg, files, {artifact: spm.read_bytes()}, packed=True)
    convert = runpy.run_path(str(CONVERTERS / "convert_nemo_gpt_to_mcore.py"))["main"]
    convert(["--in-file", str(root / "legacy.nemo"), "--out-file", str(root / "legacy_converted.nemo")])
    return {"legacy_converted": root / "legacy_converted.nemo"}


def write_sentencepiece_with_special_tokens(root: Path) -> dict[str, Path]:
    """Models saved directly (``save_to``) with a SentencePiece tokenizer in NeMo's legacy mode, which adds chat
    markers as single ids past the model's pieces: with bos/eos named as NeMo's legacy mode needs, and (warned
    about) with a bare list."""
    directory = root / "spm_legacy"
    directory.mkdir()
    named = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "<extra_id_0>", "cls_token": "<extra_id_1>"}
    out = {}
    for name, special_tokens in (("sentencepiece_legacy", named), (SPM_LIST, ["<extra_id_0>", "<extra_id_1>"])):
        tokenizer = {
            "library": "sentencepiece",
            "model": str(_spm_model(directory)),
            "sentencepiece_legacy": True,
            "special_tokens": special_tokens,
        }
        model = MegatronGPTModel(tiny_model_cfg(tokenizer=tokenizer))
        perturb_(model, seed=11)
        model.save_to(root / f"{name}.nemo")
        out[name] = root / f"{name}.nemo"
    return out


# ------------------------------------------------------------------ our side and NeMo's side
def our_results(path: Path) -> dict:
    """What this library computes from a file: logits for fixed ids (one tokenized string, one random row)."""
    model = MegatronGPTModel.restore_from(path).eval()
    tokenizer = model.tokenizer
    text_ids = (tokenizer.text_to_ids(" ".join(STRINGS[:3])) * 16)[:16]
    random_ids = torch.randint(0, tokenizer.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([text_ids, random_ids.tolist()])
    with torch.no_grad():
        logits = model(input_ids).float()
    library = model.cfg.tokenizer.library
    strings = STRINGS + [{"huggingface": HF_SPECIAL_TEXT, "sentencepiece": SPM_SPECIAL_TEXT}.get(library, BYTE_TEXT)]
    return {
        "input_ids": input_ids,
        "logits": logits,
        "strings": strings,
        "ids": [tokenizer.text_to_ids(s) for s in strings],
        "library": library,
        "eos_id": tokenizer.eos_id,
    }


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Per kind of file: (our results, NeMo's results)."""
    venv = NemoVenvBuild()  # in the background while the files are written
    root = tmp_path_factory.mktemp("our_nemo_files")
    try:
        notes = captured_log("nemo_aligner.tokenizers", logging.INFO)  # the byte-level note is a log line
        with warnings.catch_warnings(record=True) as caught, notes as noted:
            warnings.simplefilter("always", NemoTokenizerWarning)
            files = {
                **write_hf_conversions(root),
                **write_legacy_conversion(root),
                **write_sentencepiece_with_special_tokens(root),
                **write_training_runs(root),
            }
        ours = {name: our_results(path) for name, path in files.items()}
    finally:
        venv_python = venv.wait()  # never leave a build running behind a failed writer
    # Control: a file whose config says another rotary_base than its model had; NeMo's logits must then differ.
    files[CONTROL] = repack(files["legacy_converted"], root / "control.nemo", rotary_base=500000)
    ours[CONTROL] = ours["legacy_converted"]
    request = {
        "patches_dir": str(TOOLKIT),
        "files": [
            {
                "name": name,
                "path": str(path),
                "input_ids": ours[name]["input_ids"].tolist(),
                "strings": ours[name]["strings"],
            }
            for name, path in files.items()
        ],
    }
    (root / "request.json").write_text(json.dumps(request))
    done = run_nemo(
        venv_python, Path(__file__).with_name("nemo_side.py"), str(root / "request.json"), str(root / "nemo.pt")
    )
    assert done.returncode == 0, done.stderr[-5000:]
    theirs = torch.load(root / "nemo.pt", weights_only=False)
    warned = [str(w.message) for w in caught if issubclass(w.category, NemoTokenizerWarning)]
    noted = [record.getMessage() for record in noted]
    return {name: (ours[name], theirs[name]) for name in files} | {"_warnings": warned, "_notes": noted}


KINDS = [
    "hf_llama",
    "hf_mistral",
    "hf_qwen2",
    "legacy_converted",
    "sentencepiece_legacy",
    "sft",
    "dpo",
    "dpo_lora_merged",
    "spin",
    "self_rewarding",
]


@pytest.mark.parametrize("kind", KINDS)
def test_nemo_restores_the_file_with_our_logits_and_token_ids(compared, kind, record_property):
    ours, theirs = compared[kind]
    assert "error" not in theirs, f"NeMo could not restore the {kind} file:\n{theirs.get('error')}"
    assert theirs["logits"].shape == ours["logits"].shape
    max_diff = (theirs["logits"] - ours["logits"]).abs().max().item()
    print(f"\n{kind}: max |logit diff| NeMo vs ours = {max_diff:.3g} ({ours['library']} tokenizer)")
    record_property("max_abs_logit_diff", max_diff)
    assert max_diff <= LOGIT_ATOL
    checked = ours["strings"] if ours["library"] != "byte-level" else STRINGS  # see the byte-level test below
    assert theirs["ids"][: len(checked)] == ours["ids"][: len(checked)]
    assert theirs["eos_id"] == ours["eos_id"]


def test_the_comparison_sees_a_config_nemo_reads_differently(compared):
    """A converted file with another rotary_base (against our logits of the original): far outside 1e-4."""
    ours, theirs = compared[CONTROL]
    assert (theirs["logits"] - ours["logits"]).abs().max().item() > 1e-2


def test_byte_level_chat_markers_differ_in_nemo_and_the_file_says_so(compared):
    """The one tokenizer NeMo rebuilds differently (docs/checkpoints.md): writing the file logged a note about it
    (a note, not a warning: same ids and logits in NeMo), and NeMo does encode a chat marker as bytes where we give
    its single id. No other file warned but the legacy SentencePiece one below."""
    ours, theirs = compared["sft"]
    assert all("sentencepiece_legacy" in w for w in compared["_warnings"])
    assert ours["ids"][-1] != theirs["ids"][-1]
    assert theirs["ids"][-1] == list(BYTE_TEXT.encode())
    assert any("special_tokens" in n and "byte-level" in n for n in compared["_notes"])


def test_sentencepiece_legacy_without_named_eos_fails_in_nemo_and_the_file_says_so(compared):
    """NeMo restores the weights, but its legacy SentencePiece tokenizer has no eos id without a named eos_token."""
    _, theirs = compared[SPM_LIST]
    assert "has no attribute 'eos_token'" in theirs["error"]
    assert any("sentencepiece_legacy" in w and "eos_id fails" in w for w in compared["_warnings"])

"""Tokenizers against NeMo's recorded outputs (tests/fixtures/nemo) and for single-id special tokens."""

import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from nemo_aligner.tokenizers import build_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
FIXTURE_NAMES = ["tiny_gpt_ln_gelu_abs", "tiny_gpt_rms_swiglu_rope_gqa", "tiny_gpt_ln_swiglu_rope50"]
CHAT_SPECIALS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<|begin_of_text|>", "<|eot_id|>"]
HF_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model reads the old book.",
    "Hello world, héllo wörld 日本語",
]


def _extract_artifacts(nemo_file: Path, out_dir: Path) -> Path:
    """Copy the regular files at the root of a .nemo tar into out_dir, by basename only (no path traversal)."""
    with tarfile.open(nemo_file) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if member.isfile() and len(name.parts) == 1 and name.name != "..":  # "./x" has the single part "x"
                (out_dir / name.name).write_bytes(tar.extractfile(member).read())
    return out_dir


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def nemo_fixture(request, tmp_path_factory):
    """(tokenizer built from the fixture's model_config.yaml, recorded NeMo outputs, expected.pt) per fixture."""
    name = request.param
    config = yaml.safe_load((FIXTURES / f"{name}.model_config.yaml").read_text())
    artifact_dir = _extract_artifacts(FIXTURES / f"{name}.nemo", tmp_path_factory.mktemp(name))
    tokenizer = build_tokenizer(config["tokenizer"], artifact_dir=artifact_dir)
    recorded = json.loads((FIXTURES / f"{name}.tokenizer.json").read_text())
    expected = torch.load(FIXTURES / f"{name}.expected.pt", weights_only=True)
    return tokenizer, recorded, expected


def test_fixture_library_matches_config(nemo_fixture):
    tokenizer, recorded, _ = nemo_fixture
    expected_class = {"sentencepiece": "SentencePieceTokenizer", "byte-level": "ByteLevelTokenizer"}
    assert type(tokenizer).__name__ == expected_class[recorded["library"]]


def test_fixture_special_ids_and_vocab_size(nemo_fixture):
    tokenizer, recorded, expected = nemo_fixture
    assert tokenizer.vocab_size == recorded["vocab_size"] == expected["tokenizer_vocab_size"]
    assert tokenizer.bos_id == recorded["bos_id"]
    assert tokenizer.eos_id == recorded["eos_id"]
    assert tokenizer.pad_id == recorded["pad_id"]
    assert tokenizer.unk_id == recorded["unk_id"]


def test_fixture_cases_match_nemo(nemo_fixture):
    tokenizer, recorded, _ = nemo_fixture
    for case in recorded["cases"]:
        assert tokenizer.text_to_ids(case["text"]) == case["ids"], case["text"]
        assert tokenizer.text_to_tokens(case["text"]) == case["tokens"], case["text"]
        assert tokenizer.ids_to_text(case["ids"]) == case["decoded"], case["text"]
        assert tokenizer.tokens_to_ids(case["tokens"]) == case["ids"], case["text"]
        if tokenizer.unk_id not in case["ids"]:  # an unknown id's token is "<unk>", not the original character
            assert tokenizer.ids_to_tokens(case["ids"]) == case["tokens"], case["text"]


def test_fixture_input_row0_is_nemo_tokenization(nemo_fixture):
    tokenizer, recorded, expected = nemo_fixture
    sentence = "The quick brown fox jumps over the lazy dog. A small model reads the old book."
    row0 = expected["input_ids"][0]
    assert tokenizer.text_to_ids(sentence)[:16] == row0.tolist()
    assert tokenizer.ids_to_text(row0) == recorded["input_ids_row0_text"]


def test_byte_level_special_tokens_are_single_ids():
    tokenizer = build_tokenizer({"library": "byte-level", "special_tokens": CHAT_SPECIALS})
    # NeMo's ByteLevelTokenizer numbers special tokens down from the top: the first listed gets the highest id.
    assert tokenizer.vocab_size == 512 + len(CHAT_SPECIALS)
    assert tokenizer.special_token_ids == {token: 516 - i for i, token in enumerate(CHAT_SPECIALS)}
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, None, 259)

    text = "<|begin_of_text|>User: hé<extra_id_1>Assistant<extra_id_2> ok<|eot_id|>"
    ids = tokenizer.text_to_ids(text)
    bot, eid1, eid2, eot = (tokenizer.token_to_id(t) for t in ["<|begin_of_text|>", *CHAT_SPECIALS[1:3], "<|eot_id|>"])
    assert ids == [bot, *b"User: h\xc3\xa9", eid1, *b"Assistant", eid2, *b" ok", eot]
    assert tokenizer.ids_to_text(ids) == text
    assert tokenizer.text_to_tokens("a<extra_id_0>") == [97, "<extra_id_0>"]
    assert tokenizer.tokens_to_ids([97, "<extra_id_0>", "b"]) == [97, 516, 98]
    # NeMo's own decoding drops special tokens; that stays available.
    assert tokenizer.ids_to_text(ids, remove_special_tokens=True) == "User: héAssistant ok"
    # Unused ids (256-511) and ids past the vocabulary decode to nothing.
    assert tokenizer.ids_to_text([104, 259, 600, 105]) == "hi"


def test_omegaconf_config_is_accepted():
    cfg = OmegaConf.create({"library": "byte-level", "special_tokens": ["<extra_id_1>"]})
    assert build_tokenizer(cfg).text_to_ids("a<extra_id_1>") == [97, 512]


def test_byte_level_special_tokens_longest_match_first():
    tokenizer = build_tokenizer({"library": "byte-level", "special_tokens": ["<|im|>", "<|im|>start"]})
    ids = tokenizer.text_to_ids("<|im|>start x<|im|>")
    assert ids == [tokenizer.token_to_id("<|im|>start"), *b" x", tokenizer.token_to_id("<|im|>")]
    assert tokenizer.ids_to_text(ids) == "<|im|>start x<|im|>"


def test_byte_level_without_special_tokens_leaves_markers_as_bytes():
    tokenizer = build_tokenizer({"library": "byte-level"})
    assert tokenizer.text_to_ids("<|eot_id|>") == list(b"<|eot_id|>")
    assert tokenizer.token_to_id("<|eot_id|>") is None


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """The SentencePiece model NeMo stored in fixture 1."""
    out_dir = _extract_artifacts(FIXTURES / "tiny_gpt_ln_gelu_abs.nemo", tmp_path_factory.mktemp("spm"))
    return next(out_dir.glob("*_tok.model"))


def test_sentencepiece_legacy_special_tokens(spm_model):
    cfg = {
        "library": "sentencepiece",
        "model": str(spm_model),
        "sentencepiece_legacy": True,
        "special_tokens": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<extra_id_1>"},
    }
    tokenizer = build_tokenizer(cfg)
    plain = build_tokenizer({"library": "sentencepiece", "model": str(spm_model)})
    # "<s>" and "</s>" are already pieces 1 and 2; "<extra_id_1>" is new and gets the next id.
    assert tokenizer.vocab_size == 201
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 200)
    assert tokenizer.token_to_id("<extra_id_1>") == 200
    assert plain.token_to_id("<extra_id_1>") is None

    ids = tokenizer.text_to_ids("<s>a small model<extra_id_1> Hello</s> Hello")
    hello = plain.text_to_ids(" Hello")
    assert hello[0] == plain.token_to_id("▁")
    # A lone "▁" right after a special token is dropped, as NeMo does (not for the text after the last one).
    assert ids == [1, *plain.text_to_ids("a small model"), 200, *hello[1:], 2, *hello]
    assert tokenizer.text_to_tokens("<extra_id_1> Hello<extra_id_1>") == [
        "<extra_id_1>",
        *plain.text_to_tokens(" Hello")[1:],
        "<extra_id_1>",
    ]
    assert tokenizer.ids_to_text(ids) == "<s> a small model <extra_id_1> Hello </s> Hello"
    assert tokenizer.ids_to_text(ids, remove_special_tokens=True) == "a small model Hello Hello"
    # NeMo puts one space on each side of every special token, so adjacent ones end up two spaces apart.
    assert tokenizer.ids_to_text([1, 200, *hello]) == "<s>  <extra_id_1> Hello"


def test_sentencepiece_special_tokens_need_legacy(spm_model):
    cfg = {"library": "sentencepiece", "model": str(spm_model), "special_tokens": ["<extra_id_1>"]}
    with pytest.raises(ValueError, match="sentencepiece_legacy"):
        build_tokenizer(cfg)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny byte-level BPE with <|begin_of_text|> (added by its post-processor) and <|eot_id|> as special tokens,
    saved as tokenizer.json, as a transformers directory, and as GPT-2 style vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = tmp_path_factory.mktemp("hf")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(HF_CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    backend.save(str(out_dir / "tokenizer.json"))
    backend.model.save(str(out_dir))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(out_dir / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(out_dir / "saved"))
    return {
        "json": out_dir / "tokenizer.json",
        "dir": out_dir / "saved",
        "vocab": out_dir / "vocab.json",
        "merges": out_dir / "merges.txt",
    }


CHAT_TEXT = "<|begin_of_text|>Hello world, héllo<|eot_id|> the end 日本語"


def _check_hf_round_trip(tokenizer) -> None:
    ids = tokenizer.text_to_ids(CHAT_TEXT)
    assert ids.count(tokenizer.token_to_id("<|begin_of_text|>")) == 1
    assert ids.count(tokenizer.token_to_id("<|eot_id|>")) == 1
    assert ids[0] == tokenizer.token_to_id("<|begin_of_text|>")
    assert tokenizer.ids_to_text(ids) == CHAT_TEXT
    assert tokenizer.tokens_to_ids(tokenizer.text_to_tokens(CHAT_TEXT)) == ids
    assert tokenizer.ids_to_tokens(ids) == tokenizer.text_to_tokens(CHAT_TEXT)
    # NeMo's AutoTokenizer wrapper encodes without the post-processor's BOS.
    plain = tokenizer.text_to_ids("Hello world")
    assert tokenizer.tokenizer("Hello world")["input_ids"] == [0, *plain]


def test_huggingface_tokenizer_json_with_config_keys(hf_files):
    cfg = {"library": "huggingface", "type": str(hf_files["json"]), "eos_token": "<|eot_id|>", "pad_token": "<pad>"}
    tokenizer = build_tokenizer(cfg)
    _check_hf_round_trip(tokenizer)
    assert tokenizer.vocab_size == 300
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (None, 1, 2, None)
    assert tokenizer.special_token_ids == {"<|begin_of_text|>": 0, "<|eot_id|>": 1, "<pad>": 2}


def test_huggingface_directory_reads_its_config(hf_files):
    tokenizer = build_tokenizer({"library": "huggingface", "type": str(hf_files["dir"])})
    _check_hf_round_trip(tokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.ids_to_text(tokenizer.text_to_ids(CHAT_TEXT), remove_special_tokens=True) == (
        "Hello world, héllo the end 日本語"
    )


def test_huggingface_nemo_artifact_and_added_special_tokens(hf_files, tmp_path):
    artifact = "0123456789abcdef0123456789abcdef_tokenizer.json"
    (tmp_path / artifact).write_bytes(hf_files["json"].read_bytes())
    cfg = {
        "library": "huggingface",
        "type": "meta-llama/Meta-Llama-3-8B",
        "model": f"nemo:{artifact}",
        "special_tokens": {"additional_special_tokens": ["<extra_id_1>"]},
    }
    tokenizer = build_tokenizer(cfg, artifact_dir=tmp_path)
    assert tokenizer.vocab_size == 301
    assert tokenizer.token_to_id("<extra_id_1>") == 300
    ids = tokenizer.text_to_ids("a<extra_id_1>b")
    assert ids[1] == 300 and len(ids) == 3
    assert tokenizer.ids_to_text(ids) == "a<extra_id_1>b"


def test_huggingface_vocab_and_merges_match_tokenizer_json(hf_files):
    cfg = {
        "library": "huggingface",
        "type": "gpt2",
        "vocab_file": str(hf_files["vocab"]),
        "merge_file": str(hf_files["merges"]),
    }
    tokenizer = build_tokenizer(cfg)
    reference = build_tokenizer({"library": "huggingface", "type": str(hf_files["json"])})
    for text in HF_CORPUS:
        assert tokenizer.text_to_ids(text) == reference.text_to_ids(text)
        assert tokenizer.ids_to_text(tokenizer.text_to_ids(text)) == text


def test_missing_file_names_key_and_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*nope\.model"):
        build_tokenizer({"library": "sentencepiece", "model": str(missing)})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*abc_tok\.model"):
        build_tokenizer({"library": "sentencepiece", "model": "nemo:abc_tok.model"}, artifact_dir=tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer\.model.*artifact_dir"):
        build_tokenizer({"library": "sentencepiece", "model": "nemo:abc_tok.model"})
    with pytest.raises(ValueError, match=r"tokenizer\.model.*outside"):
        build_tokenizer({"library": "sentencepiece", "model": "nemo:../abc_tok.model"}, artifact_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.type.*never downloaded"):
        build_tokenizer({"library": "huggingface", "type": "meta-llama/Meta-Llama-3-8B"})


def test_corrupt_sentencepiece_model_names_key(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"tokenizer\.model.*bad\.model"):
        build_tokenizer({"library": "sentencepiece", "model": str(bad)})


def test_unknown_library_lists_supported_values():
    with pytest.raises(ValueError, match=r"tokenizer\.library.*'tiktoken'.*byte-level, huggingface, sentencepiece"):
        build_tokenizer({"library": "tiktoken"})


def test_bad_special_tokens_are_rejected():
    with pytest.raises(ValueError, match=r"tokenizer\.special_tokens"):
        build_tokenizer({"library": "byte-level", "special_tokens": {"eos_token": "<eos>"}})
    with pytest.raises(ValueError, match=r"tokenizer\.special_tokens"):
        build_tokenizer({"library": "byte-level", "special_tokens": ["<a>", "<a>"]})

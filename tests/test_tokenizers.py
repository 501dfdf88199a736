"""Tokenizers against NeMo's recorded outputs (tests/fixtures/nemo) and for single-id special tokens."""

import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from nemo_aligner.tokenizers import HuggingFaceJsonTokenizer, HuggingFaceTokenizer, _hf_special_tokens, build_tokenizer

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
    # NeMo's AutoTokenizer wrapper encodes without the post-processor's BOS (which transformers' default adds).
    plain = tokenizer.text_to_ids("Hello world")
    assert _transformers_fast(tokenizer)("Hello world")["input_ids"] == [0, *plain]


def _transformers_fast(tokenizer):
    """The transformers tokenizer of a HuggingFaceTokenizer, or one from the same tokenizer.json for the others."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, HuggingFaceTokenizer):
        return tokenizer.tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer)


def test_huggingface_tokenizer_json_with_config_keys(hf_files):
    cfg = {"library": "huggingface", "type": str(hf_files["json"]), "eos_token": "<|eot_id|>", "pad_token": "<pad>"}
    tokenizer = build_tokenizer(cfg)
    assert isinstance(tokenizer, HuggingFaceJsonTokenizer)  # no transformers needed for a tokenizer.json
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


# ---------------------------------------------------------------------------------------------------------------
# A tokenizer.json run by the tokenizers library alone behaves as transformers' PreTrainedTokenizerFast does
# ---------------------------------------------------------------------------------------------------------------

EQUIVALENCE_TEXTS = [
    *HF_CORPUS,
    CHAT_TEXT,
    "",
    "  two  spaces\tand a tab\n\nnewlines ",
    "<pad><pad>x</s><s>y<unk> <new_eos>z<new_a><new_b>",
    "a[pad]b a [PAD] b",
    "UPPER lower MiXeD 12345 ünïcödé ½ ﬁ",
]
SPECIAL_CONFIGS = {
    "none": {},
    "named_existing_and_new": {"eos_token": "<|eot_id|>", "pad_token": "<new_pad>", "unk_token": "<unk>"},
    "new_ids_in_nemos_order": {
        "eos_token": "<new_eos>",
        "additional_special_tokens": ["<new_a>", "<new_b>"],
        "bos_token": "<s>",
    },
    "separator_and_classifier_fallbacks": {"sep_token": "</s>", "cls_token": "<s>"},
}


def _backend_files(directory: Path, bpe_json: Path) -> dict[str, Path]:
    """tokenizer.json files of three families: byte-level BPE with a post-processor (Llama 3 / GPT-2 style), a
    lower-casing WordLevel with no decoder, truncation and padding set in the file, and a Metaspace (SentencePiece
    style) BPE with its decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    word_level = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "the", "end", "x", "y"])}, "<unk>")
    )
    word_level.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.enable_truncation(max_length=4)
    word_level.enable_padding(length=16, pad_id=0, pad_token="<unk>")
    word_level.save(str(directory / "word_level.json"))

    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    metaspace.train_from_iterator(HF_CORPUS + EQUIVALENCE_TEXTS, trainer)
    metaspace.save(str(directory / "metaspace.json"))

    # Its padding names an added token that is normalized (lower-cased): transformers keeps that token as it is.
    normalized_pad = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "a", "b", "[", "]"])}, "<unk>"))
    normalized_pad.normalizer = normalizers.Lowercase()
    normalized_pad.pre_tokenizer = pre_tokenizers.Whitespace()
    normalized_pad.add_tokens([AddedToken("[PAD]", normalized=True, lstrip=True)])
    normalized_pad.enable_padding(pad_id=normalized_pad.token_to_id("[PAD]"), pad_token="[PAD]")
    normalized_pad.save(str(directory / "normalized_pad.json"))
    return {
        "byte_level_bpe": bpe_json,
        "word_level": directory / "word_level.json",
        "metaspace": directory / "metaspace.json",
        "normalized_pad": directory / "normalized_pad.json",
    }


def _observed(tokenizer) -> dict:
    """Everything the library reads from a tokenizer, over EQUIVALENCE_TEXTS."""
    ids = [tokenizer.text_to_ids(text) for text in EQUIVALENCE_TEXTS]
    return {
        "ids": ids,
        "tokens": [tokenizer.text_to_tokens(text) for text in EQUIVALENCE_TEXTS],
        "text": [tokenizer.ids_to_text(i) for i in ids],
        "text_without_special": [tokenizer.ids_to_text(i, remove_special_tokens=True) for i in ids],
        "tokens_to_ids": [tokenizer.tokens_to_ids([*tokenizer.ids_to_tokens(i), "never-a-token"]) for i in ids],
        "token_to_id": [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<new_a>", "the", "never-a-token")],
        "named_ids": (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id),
        "vocab_size": tokenizer.vocab_size,
        "special_token_ids": tokenizer.special_token_ids,
        "named_special_tokens": tokenizer.named_special_tokens,
    }


@pytest.mark.parametrize("special", SPECIAL_CONFIGS.values(), ids=SPECIAL_CONFIGS.keys())
def test_tokenizer_json_behaves_as_transformers(hf_files, tmp_path, special):
    """The independent expectation is the class this one replaced for tokenizer.json files: transformers'
    ``PreTrainedTokenizerFast(tokenizer_file=...)`` in :class:`HuggingFaceTokenizer`."""
    from transformers import PreTrainedTokenizerFast

    for family, path in _backend_files(tmp_path, hf_files["json"]).items():
        cfg = {"library": "huggingface", "type": str(path), "special_tokens": special}
        ours = build_tokenizer(cfg)
        assert isinstance(ours, HuggingFaceJsonTokenizer)
        expected = HuggingFaceTokenizer(PreTrainedTokenizerFast(tokenizer_file=str(path)), _hf_special_tokens(cfg))
        assert _observed(ours) == _observed(expected), family


def test_new_special_tokens_get_ids_in_nemos_order(hf_files, caplog):
    """NeMo's AutoTokenizer registers unk, mask, pad, sep, eos, bos, cls, then the additional tokens, whatever the
    config's order; the BPE has 300 ids, so the four new tokens get 300-303 in that order, which a warning lists."""
    special = SPECIAL_CONFIGS["new_ids_in_nemos_order"]  # eos, additional, bos
    expected = {"<new_eos>": 300, "<s>": 301, "<new_a>": 302, "<new_b>": 303}
    for tokenizer_type in (hf_files["json"], hf_files["dir"]):
        caplog.clear()
        tokenizer = build_tokenizer({"library": "huggingface", "type": str(tokenizer_type), "special_tokens": special})
        assert {token: tokenizer.token_to_id(token) for token in expected} == expected, tokenizer_type
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, tokenizer_type
        assert all(f"{token!r}: {i}" in warnings[0] for token, i in expected.items()), warnings[0]
        caplog.clear()  # one new token (and existing ones) decides no order: no warning
        build_tokenizer(
            {"library": "huggingface", "type": str(tokenizer_type), "special_tokens": {"eos_token": "<new>"}}
        )
        assert not [r for r in caplog.records if r.levelname == "WARNING"], tokenizer_type


def test_tokenizer_json_saves_a_transformers_directory(hf_files, tmp_path):
    """What the .nemo -> Hugging Face converter writes: AutoTokenizer reads it back with the same ids, and the file's
    truncation and padding settings are kept as transformers keeps them."""
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_CONFIGS["new_ids_in_nemos_order"]
    for family, path in _backend_files(tmp_path, hf_files["json"]).items():
        ours = build_tokenizer({"library": "huggingface", "type": str(path), "special_tokens": special})
        ours.save_pretrained(tmp_path / family)
        restored = build_tokenizer({"library": "huggingface", "type": str(tmp_path / family)})
        assert isinstance(restored, HuggingFaceTokenizer)
        assert _observed(restored) == _observed(ours), family
        theirs = PreTrainedTokenizerFast(tokenizer_file=str(path))
        theirs.add_special_tokens(dict(special))
        theirs.save_pretrained(str(tmp_path / f"{family}_transformers"))
        saved, expected = (
            json.loads((tmp_path / name / "tokenizer.json").read_text()) for name in (family, f"{family}_transformers")
        )
        assert (saved["truncation"], saved["padding"]) == (expected["truncation"], expected["padding"]), family


@pytest.mark.parametrize(
    ("special_tokens", "message"),
    [
        ({"eos_token": 5}, r"special_tokens\.eos_token must be a non-empty string, got 5"),
        ({"bos_token": ""}, r"special_tokens\.bos_token must be a non-empty string"),
        ({"additional_special_tokens": "<eot>"}, r"additional_special_tokens must be a list of non-empty strings"),
        ({"additional_special_tokens": ["<a>", None]}, r"additional_special_tokens must be a list"),
    ],
)
def test_malformed_special_tokens_name_their_key(hf_files, special_tokens, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer({"library": "huggingface", "type": str(hf_files["json"]), "special_tokens": special_tokens})


def test_a_null_special_token_is_not_given(hf_files):
    """NeMo passes a null special token as not given; it must not become the text "None"."""
    cfg = {"library": "huggingface", "type": str(hf_files["json"])}
    tokenizer = build_tokenizer({**cfg, "special_tokens": {"bos_token": None, "eos_token": "<|eot_id|>"}})
    assert _observed(tokenizer) == _observed(build_tokenizer({**cfg, "special_tokens": {"eos_token": "<|eot_id|>"}}))
    assert tokenizer.token_to_id("None") is None and tokenizer.bos_id is None

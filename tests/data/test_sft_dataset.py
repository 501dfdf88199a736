"""Plain SFT samples: template rendering, exact loss-mask positions, truncation, and the sample mapping.

Expected ids are written by hand: with the byte-level tokenizer a character is its byte and EOS is 0. The
tokenizer is space sensitive ("x y" is not "x" + "y"), so, as in NeMo, the space before ``{output}`` belongs to
the answer piece and is scored.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from nemo_aligner.data.nlp.builders import build_sft_dataset, num_samples_for
from nemo_aligner.data.nlp.sft_dataset import PromptTemplate, build_sample_mapping
from nemo_aligner.tokenizers import ByteLevelTokenizer

EOS = 0


def plain(tokenizer, template="{input} {output}", max_seq_length=64, **kwargs) -> PromptTemplate:
    return PromptTemplate(tokenizer, template, max_seq_length=max_seq_length, **kwargs)


def test_two_samples_by_hand(write_jsonl, tokenizer):
    path = write_jsonl([{"input": "hi", "output": "yo"}, {"input": " 2+2 ", "output": "4", "id": 7}])
    data_cfg = OmegaConf.create({"chat": False})
    split_cfg = OmegaConf.create(
        {"file_path": str(path), "max_seq_length": 32, "prompt_template": "Q: {input}\\nA: {output}"}
    )
    dataset = build_sft_dataset(data_cfg, split_cfg, tokenizer, seed=0)
    assert len(dataset) == 2
    # "Q: hi\nA:" is the context (8 tokens); " yo" + EOS is the answer (values are stripped of spaces, NeMo's way).
    first, second = dataset[0], dataset[1]
    assert first["input_ids"].tolist() == list(b"Q: hi\nA: yo") + [EOS]
    assert first["loss_mask"].tolist() == [0] * 8 + [1] * 4
    assert first["prompt_length"] == 8 and first["sample_index"] == 0
    assert second["input_ids"].tolist() == list(b"Q: 2+2\nA: 4") + [EOS]
    assert second["loss_mask"].tolist() == [0] * 9 + [1] * 3
    assert second["prompt_length"] == 9 and second["sample_index"] == 1
    assert dataset.prompt_and_answer(1) == (list(b"Q: 2+2\nA:"), list(b" 4") + [EOS])


def test_render_fills_every_placeholder(tokenizer):
    template = plain(tokenizer, "{system}\n\nUser: {input}\nAssistant: {output}")
    line = {"system": "Be brief.", "input": "hi", "output": "hello"}
    assert template.render(line) == ("Be brief.\n\nUser: hi\nAssistant:", " hello")
    assert "system" in template.keys and template.validate({"input": "a", "output": "b"}) == [
        ("system", "missing key (prompt_template '{system}\\n\\nUser: {input}\\nAssistant: {output}' uses it)")
    ]


def test_bos_sep_eos(tokenizer):
    class WithBos(ByteLevelTokenizer):
        @property
        def bos_id(self) -> int:
            return 2

    sample = plain(WithBos(), add_bos=True, add_sep=True, sep_id=3, add_eos=False).tokenize(
        {"input": "a", "output": "b"}
    )
    assert sample.input_ids.tolist() == [2, ord("a"), 3, ord(" "), ord("b")]
    assert sample.loss_mask.tolist() == [0, 0, 0, 1, 1]
    # Without a BOS in the tokenizer, add_bos adds nothing.
    assert plain(tokenizer, add_bos=True).tokenize({"input": "a", "output": "b"}).input_ids.tolist() == [97, 32, 98, 0]


# (case, line, max_seq_length, truncation field, method, expected ids without EOS)
TRUNCATION = [
    ("fits", {"input": "abcdefgh", "output": "xy"}, 12, "input", "right", b"abcdefgh xy"),
    ("input_right", {"input": "abcdefgh", "output": "xy"}, 8, "input", "right", b"abcd xy"),
    ("input_left", {"input": "abcdefgh", "output": "xy"}, 8, "input", "left", b"efgh xy"),
    ("output_right", {"input": "ab", "output": "uvwxyz"}, 6, "output", "right", b"ab uv"),
    ("output_left", {"input": "ab", "output": "uvwxyz"}, 6, "output", "left", b"abxyz"),
    # The field is too short for the excess: the rest comes off the other pieces, from the end (right).
    ("fallback_right", {"input": "ab", "output": "uvwxyz"}, 6, "input", "right", b" uvwx"),
]


@pytest.mark.parametrize(
    "line,max_len,field,method,expected", [c[1:] for c in TRUNCATION], ids=[c[0] for c in TRUNCATION]
)
def test_truncation(tokenizer, line, max_len, field, method, expected):
    template = plain(tokenizer, max_seq_length=max_len, truncation_fields=field, truncation_method=method)
    sample = template.tokenize(line)
    assert sample.input_ids.tolist() == list(expected) + [EOS]
    untruncated = plain(tokenizer, max_seq_length=1000).tokenize(line)
    assert sample.truncated == (len(untruncated.input_ids) > max_len)


def test_truncation_is_shared_over_fields(tokenizer):
    template = plain(tokenizer, "{a}|{b}|{output}", max_seq_length=8, truncation_fields="a,b", add_eos=False)
    # 4 + 1 + 4 + 1 + 2 = 12 tokens, 4 too many: 2 come off each field.
    assert template.tokenize({"a": "aaaa", "b": "bbbb", "output": "zz"}).input_ids.tolist() == list(b"aa|bb|zz")


def test_truncated_samples_are_counted(write_jsonl, tokenizer, caplog):
    path = write_jsonl([{"input": "a" * 40, "output": "b"}, {"input": "a", "output": "b"}])
    split_cfg = OmegaConf.create({"file_path": str(path), "max_seq_length": 16})
    with caplog.at_level(logging.WARNING):
        dataset = build_sft_dataset(OmegaConf.create({}), split_cfg, tokenizer, seed=0)
    assert len(dataset[0]["input_ids"]) == 16
    assert "1 of 2 samples were truncated" in caplog.text


def test_config_errors_name_the_key(tokenizer):
    with pytest.raises(ValueError, match="must end with the label placeholder"):
        plain(tokenizer, "{output} {input}")
    with pytest.raises(ValueError, match="truncation_field"):
        plain(tokenizer, truncation_fields="context")
    with pytest.raises(ValueError, match="truncation_method"):
        plain(tokenizer, truncation_method="middle")


def test_sample_mapping_upsamples_in_shuffled_passes():
    mapping = build_sample_mapping(5, 12, seed=3)
    assert len(mapping) == 12
    assert sorted(mapping[:5]) == sorted(mapping[5:10]) == list(range(5))
    assert set(Counter(mapping.tolist()).values()) == {2, 3}
    assert np.array_equal(mapping, build_sample_mapping(5, 12, seed=3))
    assert not np.array_equal(mapping, build_sample_mapping(5, 12, seed=4))


def test_sample_mapping_subsamples_without_repeats():
    mapping = build_sample_mapping(10, 4, seed=0)
    assert len(set(mapping.tolist())) == 4


def test_sample_true_builds_num_samples_items(write_jsonl, tokenizer):
    lines = [{"input": str(i), "output": "x"} for i in range(5)]
    path = write_jsonl(lines)
    data_cfg = OmegaConf.create({"sample": True})
    num_samples = num_samples_for(data_cfg, max_steps=3, global_batch_size=4)
    assert num_samples == 12 and num_samples_for(OmegaConf.create({"sample": False}), 3, 4) is None
    split_cfg = OmegaConf.create({"file_path": str(path), "max_seq_length": 16})
    dataset = build_sft_dataset(data_cfg, split_cfg, tokenizer, seed=5, num_samples=num_samples)
    assert len(dataset) == 12 and dataset.num_unique_samples == 5
    for i in range(12):
        item = dataset[i]
        assert item["input_ids"][0].item() == ord(str(item["sample_index"]))
    again = build_sft_dataset(data_cfg, split_cfg, tokenizer, seed=5, num_samples=num_samples)
    assert [dataset[i]["sample_index"] for i in range(12)] == [again[i]["sample_index"] for i in range(12)]


def test_filler_item(write_jsonl, tokenizer):
    path = write_jsonl([{"input": "a", "output": "b"}])
    dataset = build_sft_dataset({}, {"file_path": str(path), "max_seq_length": 8}, tokenizer, seed=0)
    filler = dataset[-1]
    assert filler["sample_index"] == -1 and filler["loss_mask"].sum() == 0
    assert filler["input_ids"].tolist() == [tokenizer.pad_id]
    with pytest.raises(IndexError):
        dataset[1]

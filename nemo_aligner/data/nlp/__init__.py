"""Language-model data: jsonl reading and validation, SFT samples (plain and chat), collate, samplers, builders.

Modules, bottom up: ``jsonl`` (read + validate, ``DataError``), ``sft_dataset`` (plain prompt templates, tokenized
samples, the dataset), ``chat`` (NeMo chat rendering and loss masks), ``collate``, ``samplers`` and ``builders``
(config -> parts).
"""

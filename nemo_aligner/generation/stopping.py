"""When a generated response has ended: the tokenizer's EOS id or one of the configured ``end_strings``."""

from __future__ import annotations

from collections.abc import Sequence

from nemo_aligner.tokenizers import Tokenizer


class EndDetector:
    """Decides whether a response has ended, from its token ids.

    An end string that is a special token of the tokenizer (``<extra_id_1>``, ``<|eot_id|>``, ...) ends a response
    exactly when that id is generated, and so does the EOS id. Any other end string ends a response when the
    decoded response text ends with it; a string that is also a single token (e.g. a one-byte character for the
    byte-level tokenizer, whose decoding strips trailing whitespace) ends it on that id as well. The end token
    stays in the response: training scores it.
    """

    def __init__(self, tokenizer: Tokenizer, end_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        special = tokenizer.special_token_ids
        end_ids = {tokenizer.eos_id} if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else set()
        texts = []
        for string in end_strings:
            token_id = special.get(string, tokenizer.token_to_id(string))
            if token_id is not None:
                end_ids.add(token_id)
            if string not in special:
                texts.append(string)
        self.end_ids: tuple[int, ...] = tuple(sorted(end_ids))
        self._end_id_set = frozenset(end_ids)
        self._texts = tuple(texts)
        self._longest = max((len(t) for t in texts), default=0)

    def has_ended(self, response: Sequence[int]) -> bool:
        """True when ``response`` (the generated ids so far) ends with an end token or an end string."""
        if not response:
            return False
        if response[-1] in self._end_id_set:
            return True
        return bool(self._texts) and self._tail_text(response).endswith(self._texts)

    def _tail_text(self, response: Sequence[int]) -> str:
        """Decoded text of the last tokens of ``response``, long enough to hold the longest end string.

        Decoding only a tail keeps the check O(1) per step. The first character of a decoded tail may differ
        from the full decoding (a cut multi-byte character, a dropped leading space), so the tail grows until it
        has more characters than the longest end string, or is the whole response.
        """
        window = self._longest + 1
        while True:
            text = self.tokenizer.ids_to_text(list(response[-window:]))
            if len(text) > self._longest or window >= len(response):
                return text
            window *= 2

"""``sequence_ends``: the width each row of a scoring mask needs."""

from __future__ import annotations

import torch

from nemo_aligner.utils.batching import sequence_ends


def test_sequence_ends_is_one_past_the_last_scored_column_and_1_for_an_empty_row():
    mask = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0, 0.0],  # scored tokens 2-3: needs 4 columns
            [0.0, 1.0, 0.0, 0.0, 1.0],  # a gap does not matter: the last scored column decides
            [0.0, 0.0, 0.0, 0.0, 0.0],  # a filler: one column
        ]
    )
    assert sequence_ends(mask).tolist() == [4, 5, 1]
    assert sequence_ends(mask).dtype == torch.long

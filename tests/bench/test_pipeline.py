"""The main job's own pieces: the held-out next-word task it builds and the sentence its report prints."""
from __future__ import annotations

import math

import pytest

from bench.downstream import MultipleChoiceItem, _parse_item
from bench.pipeline import gain_sentence, heldout_next_word


def test_heldout_next_word_is_a_valid_four_way_task(tiny_dataset):
    items = heldout_next_word(tiny_dataset, 50)
    assert len(items) == 50
    parsed = [_parse_item(item, f"item {i}") for i, item in enumerate(items)]
    assert all(isinstance(p, MultipleChoiceItem) and len(p.choices) == 4 for p in parsed)
    for p in parsed:
        assert len({c.lower() for c in p.choices}) == 4, p.choices  # the answer is never also a distractor
        assert p.query and not p.query.endswith(" ")
    golds = [p.gold for p in parsed]
    assert len(set(golds)) > 1  # the answer is not always in the same place
    assert heldout_next_word(tiny_dataset, 50) == items  # seeded: every run of the job scores the same items


@pytest.mark.parametrize("gain, kept, expect", [
    (0.05, 0.8, "keeps 80% of it"),
    (0.05, -0.004, "keeps 0% of it"),  # a student a hair worse than the best member: not "-0%"
    (0.05, 2.0, "below the ensemble itself (200% of the gain)"),
    (-0.01, math.nan, "did not beat the best member"),
])
def test_gain_sentence(gain, kept, expect):
    assert expect in gain_sentence({"ensemble_gain": gain, "student_keeps": kept, "w": 0.75})

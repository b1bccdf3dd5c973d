"""The calibration arm (bench.science.calibration): the source's computed entropy rate is what a long sample gives (and a
wrong floor, the order-1 entropy, is told apart); the validation floor is what the source itself scores; the real
tokenizer keeps every symbol one token; a fitted limit below the floor is flagged, one above it is not."""
from __future__ import annotations

import numpy as np
import pytest

from bench.science.calibration import (
    FLOOR_FLAG,
    CalibrationError,
    MarkovSource,
    draw_chain,
    floor_rows,
    flag_below_floor,
    sample_symbols,
    symbol_tokens,
    validation_floor,
    word,
    write_corpus,
)
from bench.science.fits import fit_power_law

pytestmark = pytest.mark.fast

SMALL = MarkovSource(symbols=16, documents=300, p_end=0.02, seed=3)


def test_entropy_rate_matches_a_long_sample_and_the_order1_floor_is_told_apart():
    chain = draw_chain(SMALL)
    x = sample_symbols(chain, 100_000, np.random.default_rng(0))
    nll = -np.log(chain.T[x[:-2], x[1:-1], x[2:]])
    se = nll.std() / np.sqrt(len(nll))
    assert abs(nll.mean() - chain.entropy_rate()) < 4 * se
    # the negative control: the order-1 entropy is a wrong floor, far from the sample, and itself what a sample of
    # order-1 predictions gives (the stationary distribution behind it is right)
    assert chain.order1_entropy() - chain.entropy_rate() > 20 * se
    nll1 = -np.log(chain.bigram[x[:-1], x[1:]])
    assert abs(nll1.mean() - chain.order1_entropy()) < 4 * nll1.std() / np.sqrt(len(nll1))
    assert chain.entropy_rate() < chain.order1_entropy() < chain.unigram_entropy() <= np.log(16)


def test_the_corpus_is_deterministic_by_seed(tmp_path):
    a, b = write_corpus(SMALL, tmp_path / "a"), write_corpus(SMALL, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    c = write_corpus(MarkovSource(symbols=16, documents=300, p_end=0.02, seed=4), tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()
    with pytest.raises(CalibrationError, match="another source"):
        write_corpus(MarkovSource(symbols=16, documents=300, p_end=0.02, seed=4), tmp_path / "a")
    with pytest.raises(CalibrationError, match="symbols"):
        MarkovSource(symbols=1000)


class WordTokenizer:
    """Token id 2 for the start word, 3.. for the symbol words; `split` words come out as 2 tokens."""

    def __init__(self, split=()):
        self.split = set(split)

    def __call__(self, text, add_special_tokens=False):
        w = text.strip()
        if w in self.split:
            return {"input_ids": [7, 8]}
        return {"input_ids": [2 if w == "doc" else 3 + (ord(w[0]) - 97) * 16 + ord(w[1]) - 97]}


def stream_of(source: MarkovSource, chain, bos=0, eos=1) -> np.ndarray:
    from bench.science.calibration import documents

    tok = WordTokenizer()
    return np.array([t for doc in documents(source, chain)
                     for t in (bos, *(tok(" " + w)["input_ids"][0] for w in doc.split(" ")), eos)])


def test_the_floor_is_what_the_source_itself_scores_on_the_windows():
    source = MarkovSource(symbols=16, documents=400, p_end=0.02, seed=5)
    chain = draw_chain(source)
    start, ids = symbol_tokens(WordTokenizer(), source.symbols)
    f = validation_floor(chain, source.p_end, stream_of(source, chain), 32, 0, 1, start, ids)
    assert f["targets"] > 15_000
    assert abs(f["oracle_loss"] - f["floor"]) < 0.03  # ~4 standard errors of the sample's noise
    # short windows see less: the floor rises towards the order-1 entropy, never below the entropy rate's level
    short = validation_floor(chain, source.p_end, stream_of(source, chain), 2, 0, 1, start, ids)
    assert short["floor"] > f["floor"] > chain.entropy_rate() * (1 - source.p_end)


def test_a_split_symbol_word_is_refused():
    with pytest.raises(CalibrationError, match="splits the word ' ab'"):
        symbol_tokens(WordTokenizer(split={word(1)}), 16)


def test_the_real_tokenizer_keeps_every_symbol_one_token(tmp_path):
    from train.data import DatasetSpec, load_tokenizer, load_tokens, prepare_dataset

    corpus = write_corpus(SMALL, tmp_path / "corpus")
    manifest = prepare_dataset(DatasetSpec(corpus=(str(corpus),), vocab_size=512, val_max_tokens=2000),
                               tmp_path / "data")
    start, ids = symbol_tokens(load_tokenizer(tmp_path / "data" / "tokenizer"), SMALL.symbols)
    f = validation_floor(draw_chain(SMALL), SMALL.p_end, load_tokens(tmp_path / "data", "val"), 64,
                         manifest["bos_token_id"], manifest["eos_token_id"], start, ids)
    assert np.isfinite(f["oracle_loss"]) and abs(f["oracle_loss"] - f["floor"]) < 0.15


def test_a_limit_below_the_floor_is_flagged_and_one_above_is_not():
    rng = np.random.default_rng(0)
    x = np.repeat([0.1, 0.2, 0.4, 0.8, 1.6], 3)
    fit = fit_power_law(x, 0.5 / x**0.5 + 2.0 + rng.normal(0, 0.005, len(x)), n_boot=50)
    assert fit.identified and fit.C == pytest.approx(2.0, abs=0.05)
    below = flag_below_floor(fit, 2.3)
    assert any(FLOOR_FLAG in f for f in below.flags) and not below.ok and below.C == fit.C
    assert flag_below_floor(fit, 1.7) is fit
    rows = floor_rows({"law": fit}, 2.3) + floor_rows({"law": fit}, 1.7)
    assert rows[0][-1].startswith("**below the floor") and rows[1][-1] == "above the floor"

"""The calibration arm: a corpus whose best possible loss is known exactly, so a fitted asymptote can be checked.

The source is an order-2 Markov chain over `symbols` word-like symbols with hierarchical Dirichlet rows (a base
distribution, a bigram row per previous symbol drawn around it, a trigram row per previous pair drawn around its
bigram row), so a small model can learn the bigram level before the trigram one, as with text. Documents are
`x1 x2 ... xn` with x1, x2 from the chain's stationary distribution (every position is stationary) and a
geometric length: after each symbol the document ends with probability `p_end`.

Why word-like symbols: the loss is per token, so the floor must be per token. Each symbol is written as a
two-letter word (`ab`, `ac`, ...) after a space, behind a fixed first word (`doc`: a document's text is
`doc ab fk ...`, so no symbol is ever spelled without its space); the byte-level BPE tokenizer then makes every
word one token (`symbol_tokens` checks it and refuses otherwise), and the floor in nats per symbol is the floor in
nats per token. The floor is computed on the validation stream the models are scored on, target by target, from
what each target's window shows: after EOS the next token is BOS, after BOS it is `doc` (0 nats each); after `doc`
the first symbol (the stationary entropy); after one visible symbol (a document's second symbol, or a window's
first target) EOS with probability p_end or the stationary bigram conditional; after two visible symbols EOS or
the chain's row. Its mean is the
expected loss of the predictor that knows the source: no model can beat it in expectation, at any N or D, so a
fitted limit C below it is an extrapolation artifact, not a finding.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench.science.fits import JointLimitFit
from plumbing.artifacts import atomic_write_text
from plumbing.console import ChorusError

LETTERS = "abcdefghijklmnop"  # symbol i is the word LETTERS[i // 16] + LETTERS[i % 16]
START_WORD = "doc"  # every document's first word, so every symbol word follows a space


class CalibrationError(ChorusError):
    """A calibration source that cannot be built, or a tokenizer that does not map its symbols 1:1 to tokens."""


@dataclass(frozen=True)
class MarkovSource:
    """The settings of the source (a profile's `calibration` object): everything below is a function of them."""

    symbols: int = 64
    documents: int = 2000
    p_end: float = 0.005  # a document ends after each symbol with this probability (mean length 1 / p_end)
    # concentrations: the base 1/2 Dir(a0, ..., a0) + 1/2 uniform; bigram row b ~ Dir(a1 x base); trigram row
    # (a, b) ~ Dir(a2 x row b)
    alpha: tuple[float, float, float] = (0.5, 20.0, 10.0)
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.symbols <= len(LETTERS) ** 2:
            raise CalibrationError(f"calibration: symbols must be in [2, {len(LETTERS) ** 2}], not {self.symbols}")
        if not 0 < self.p_end < 1 or self.documents < 2:
            raise CalibrationError("calibration: p_end must be in (0, 1) and documents >= 2")
        if len(self.alpha) != 3 or min(self.alpha) <= 0:
            raise CalibrationError(f"calibration: alpha must be 3 positive concentrations, not {list(self.alpha)}")

    @classmethod
    def from_record(cls, record: Mapping) -> MarkovSource:
        unknown = sorted(set(record) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise CalibrationError(f"calibration: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def word(symbol: int) -> str:
    return LETTERS[symbol // len(LETTERS)] + LETTERS[symbol % len(LETTERS)]


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each distribution along the last axis (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


@dataclass(frozen=True, eq=False)
class MarkovChain:
    """The drawn chain: T[a, b, c] = P(next c | previous a, b), its stationary pair distribution, and entropies."""

    T: np.ndarray  # [S, S, S]
    pairs: np.ndarray  # [S, S] stationary P(x_{t-1} = a, x_t = b)

    @property
    def marginal(self) -> np.ndarray:
        return self.pairs.sum(axis=1)  # = sum over axis 0 at stationarity

    @property
    def bigram(self) -> np.ndarray:
        """P(next c | previous b) under stationarity: the best prediction from one visible symbol."""
        return self.pairs / self.marginal[:, None]

    def entropy_rate(self) -> float:
        """H(x_t | x_{t-2}, x_{t-1}) in nats: the floor per symbol deep inside a document."""
        return float(np.sum(self.pairs * _entropy(self.T)))

    def order1_entropy(self) -> float:
        """H(x_t | x_{t-1}): what a model that only sees one symbol back can reach (above the entropy rate)."""
        return float(np.sum(self.marginal * _entropy(self.bigram)))

    def unigram_entropy(self) -> float:
        return float(_entropy(self.marginal))


def draw_chain(source: MarkovSource, iterations: int = 10_000, tol: float = 1e-13) -> MarkovChain:
    """The chain's rows from the hierarchical Dirichlet prior (seeded) and its stationary pair distribution."""
    rng = np.random.default_rng(source.seed)
    s, (a0, a1, a2) = source.symbols, source.alpha
    # half uniform: every symbol keeps >= 1/(2S) of the mass, so it is frequent enough to become one token
    base = 0.5 * rng.dirichlet(np.full(s, a0)) + 0.5 / s
    bigram_rows = np.stack([rng.dirichlet(a1 * base + 1e-3) for _ in range(s)])  # + 1e-3: no zero parameter
    T = np.stack([np.stack([rng.dirichlet(a2 * bigram_rows[b] + 1e-3) for b in range(s)]) for _ in range(s)])
    T = np.maximum(T, 1e-300)  # a parameter that tiny can underflow to 0: keep every row strictly positive
    T /= T.sum(axis=-1, keepdims=True)
    pairs = np.full((s, s), 1.0 / s**2)
    for _ in range(iterations):  # pairs'(b, c) = sum_a pairs(a, b) T[a, b, c]; every row positive, so it converges
        nxt = np.einsum("ab,abc->bc", pairs, T)
        done = np.abs(nxt - pairs).sum() < tol
        pairs = nxt
        if done:
            break
    else:
        raise CalibrationError(f"the stationary distribution did not converge in {iterations} iterations")
    return MarkovChain(T=T, pairs=pairs / pairs.sum())


def sample_symbols(chain: MarkovChain, n: int, rng: np.random.Generator) -> np.ndarray:
    """n >= 1 consecutive symbols of the stationary chain."""
    s = chain.T.shape[0]
    out = np.empty(n, dtype=np.int64)
    first = int(rng.choice(s * s, p=chain.pairs.ravel()))
    out[0] = first // s
    if n > 1:
        out[1] = first % s
    cdf = np.cumsum(chain.T, axis=-1)
    u = rng.random(n)
    for t in range(2, n):
        row = cdf[out[t - 2], out[t - 1]]
        out[t] = min(int(np.searchsorted(row, u[t] * row[-1], side="right")), s - 1)
    return out


def documents(source: MarkovSource, chain: MarkovChain) -> list[str]:
    """The corpus: `documents` texts of space-separated symbol words, geometric lengths (seeded)."""
    rng = np.random.default_rng([source.seed, 1])
    lengths = rng.geometric(source.p_end, size=source.documents)
    return [" ".join([START_WORD, *(word(int(x)) for x in sample_symbols(chain, int(n), rng))]) for n in lengths]


def write_corpus(source: MarkovSource, out_dir: str | Path) -> Path:
    """OUT/markov.jsonl (one document per line, train.corpus's JSON lines format) and OUT/source.json; a corpus
    already there from the same source is kept as is (its bytes, and so the dataset built on it, do not change)."""
    out_dir = Path(out_dir)
    corpus, record = out_dir / "markov.jsonl", out_dir / "source.json"
    settings = json.loads(json.dumps(asdict(source)))
    if corpus.exists() and record.exists():
        if json.loads(record.read_text()) != settings:
            raise CalibrationError(f"{out_dir} holds a calibration corpus from another source; use another --out")
        return corpus
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = documents(source, draw_chain(source))
    atomic_write_text(corpus, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    atomic_write_text(record, json.dumps(settings, indent=1) + "\n")
    return corpus


def symbol_tokens(tokenizer, symbols: int) -> tuple[int, dict[int, int]]:
    """The start word's token id, and token id -> symbol (each word as it is spelled, after a space); a word the
    tokenizer splits is refused: the floor would no longer be per token."""
    def one_token(text: str) -> int:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise CalibrationError(f"the tokenizer splits the word {text!r} into {len(enc)} tokens, so the floor per "
                                   "symbol is not the floor per token (a symbol too rare in the corpus, or vocab_size "
                                   "too small)")
        return enc[0]

    return one_token(START_WORD), {one_token(" " + word(i)): i for i in range(symbols)}


def validation_floor(chain: MarkovChain, p_end: float, stream: np.ndarray, context: int, bos: int, eos: int,
                     start: int, token_symbol: Mapping[int, int]) -> dict:
    """The floor on this validation stream, scored as train.data.windows cuts it: each target's entropy under the
    source given what its window shows (module docstring), averaged over targets. Also the loss the true source
    itself gets on these very targets (`oracle_loss`: the floor plus this sample's noise)."""
    end_bits = -(p_end * math.log(p_end) + (1 - p_end) * math.log(1 - p_end))
    sym = np.array([token_symbol.get(int(t), -1) for t in stream])
    h_pair, h_one = _entropy(chain.T), _entropy(chain.bigram)
    h_first, first = chain.unigram_entropy(), chain.marginal
    floors, oracle = [], []
    for t in range(1, len(stream)):
        prev, target, pos = int(stream[t - 1]), int(stream[t]), (t - 1) % context
        if prev in (eos, bos):  # BOS follows EOS, the start word BOS
            floors.append(0.0)
            oracle.append(0.0 if target == (bos if prev == eos else start) else math.inf)
            continue
        if prev == start:
            floors.append(h_first)
            oracle.append(-math.log(first[sym[t]]) if sym[t] >= 0 else math.inf)
            continue
        if sym[t - 1] < 0:
            raise CalibrationError(f"validation token {prev} at position {t - 1} is neither BOS, EOS, the start word "
                                   "nor a symbol")
        two = pos >= 1 and sym[t - 2] >= 0  # the window shows two symbols back
        row = chain.T[sym[t - 2], sym[t - 1]] if two else chain.bigram[sym[t - 1]]
        floors.append(end_bits + (1 - p_end) * (h_pair[sym[t - 2], sym[t - 1]] if two else h_one[sym[t - 1]]))
        oracle.append(-math.log(p_end) if target == eos else -math.log((1 - p_end) * row[sym[t]]))
    return {"floor": float(np.mean(floors)), "oracle_loss": float(np.mean(oracle)), "targets": len(floors),
            "entropy_rate": chain.entropy_rate(), "order1_entropy": chain.order1_entropy(),
            "unigram_entropy": h_first, "p_end": p_end}


FLOOR_FLAG = "C below the Bayes floor"


def flag_below_floor(fit, floor: float):
    """The fit with FLOOR_FLAG added when its asymptote C lies below the floor: no model reaches below it, so such a
    limit is an artifact of extrapolating the law (a PowerLawFit or a JointLimitFit; others as they are)."""
    if fit is None or not fit.identified or not fit.C < floor:
        return fit
    flag = f"{FLOOR_FLAG} ({fit.C:.3f} < {floor:.3f}): an extrapolation artifact"
    if isinstance(fit, JointLimitFit):
        return replace(fit, over_n=flag_below_floor(fit.over_n, floor), flags=(*fit.flags, flag))
    return replace(fit, flags=(*fit.flags, flag))


def floor_rows(laws: Mapping[str, object], floor: float) -> list[list]:
    """The report's check: each identified law's C and its interval beside the floor, and the verdict."""
    rows = []
    for name, fit in laws.items():
        if fit is None or not fit.identified:
            continue
        lo, hi = fit.C_interval
        verdict = ("**below the floor: an extrapolation artifact**" if fit.C < floor
                   else "interval reaches below the floor" if lo < floor else "above the floor")
        rows.append([name, f"{fit.C:.4f}", f"[{lo:.4f}, {hi:.4f}]", f"{fit.C - floor:+.4f}", verdict])
    return rows

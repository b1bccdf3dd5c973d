"""English-like text generated in code: a corpus every machine has, for the test suite and smoke runs.

The test fixtures must not depend on files outside the repository or on the network, and a random string would
teach a model nothing, so this is a small language with structure a tiny model can learn:

- a Zipfian vocabulary: real English function words (determiners, prepositions, conjunctions, adverbs of time) and
  pseudo-English content words built from syllables (nouns, verbs, adjectives, names), each class ranked
  and drawn with weight 1 / (rank + 2.7)^1.1, as word frequencies in real text fall off (function words too,
  most frequent listed first);
- a grammar: noun phrases with determiners that agree in number with their noun ("a"/"an" by the first
  letter), subject-verb agreement in the present tense, objects, prepositional phrases, relative clauses,
  coordinated clauses, years and counts;
- documents with a topic and a tense: each draws most of its nouns and verbs from its topic's own ranking and
  keeps one tense, so earlier words in a document predict later ones (what an ensemble and a longer context
  help with); documents run to ~5.6k characters on average (paragraphs drawn from an exponential), long enough
  that an end of document is rare, as in encyclopedia text.

Deterministic: the same (n_chars, seed) gives the same text on every machine (only `random.Random` with an
integer seed). `python -m train.synthetic_text --out corpus.jsonl` writes a corpus `train data --corpus` reads;
about 2M characters make a 2048-token BPE and ~480k training tokens.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

FUNCTION_WORDS = {
    "prep": ["in", "on", "with", "near", "of", "under", "from", "for", "after", "before", "beside", "across"],
    "det_sg": ["the", "a", "this", "every", "one", "that"],
    "det_pl": ["the", "these", "many", "some", "two", "three", "those", "several"],
    "conj": ["and", "but", "while", "because", "so"],
    "adv_time": ["often", "rarely", "always", "later", "once", "again", "soon", "still"],
}
ONSETS = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "cr", "dr", "fl", "gr",
          "pl", "st", "tr", "sh", "ch", "th", "k", "j"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ee", "oa"]
CODAS = ["", "", "", "n", "r", "l", "s", "t", "m", "nd", "st", "rk", "ng", "ck"]
N_NOUNS, N_VERBS, N_ADJS, N_NAMES, N_TOPICS, TOPIC_WORDS = 1500, 420, 360, 240, 48, 120


def _zipf_cum(n: int, s: float = 1.1, q: float = 2.7) -> list[float]:
    return list(itertools.accumulate(1.0 / (r + q) ** s for r in range(n)))


class Language:
    """The vocabulary and grammar of one seed."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        seen: set[str] = set(w for ws in FUNCTION_WORDS.values() for w in ws)

        def words(n: int, syllables: tuple[int, ...]) -> list[str]:
            out = []
            while len(out) < n:
                w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                            for _ in range(rng.choice(syllables)))
                if 3 <= len(w) <= 11 and w not in seen:
                    seen.add(w)
                    out.append(w)
            return out

        self.nouns = words(N_NOUNS, (1, 1, 2, 2, 3))
        self.verbs = words(N_VERBS, (1, 1, 2))
        self.adjs = words(N_ADJS, (1, 2, 2))
        self.names = [w.capitalize() for w in words(N_NAMES, (2, 3))]
        self.topics = [(rng.sample(range(N_NOUNS), TOPIC_WORDS), rng.sample(range(N_VERBS), TOPIC_WORDS // 3))
                       for _ in range(N_TOPICS)]
        self.cum: dict[int, list[float]] = {}

    def zipf_cum(self, n: int) -> list[float]:
        if n not in self.cum:
            self.cum[n] = _zipf_cum(n)
        return self.cum[n]


class _Writer:
    """One document's state: its random stream, topic and tense."""

    def __init__(self, lang: Language, rng: random.Random):
        self.lang, self.rng = lang, rng
        self.topic_nouns, self.topic_verbs = lang.topics[rng.randrange(N_TOPICS)]
        self.past = rng.random() < 0.4

    def zipf(self, items: list):
        """One of `items`, the first most often (function words are listed most frequent first)."""
        return self.rng.choices(items, cum_weights=self.lang.zipf_cum(len(items)))[0]

    def noun(self) -> str:
        if self.rng.random() < 0.65:
            return self.lang.nouns[self.zipf(self.topic_nouns)]
        return self.zipf(self.lang.nouns)

    def verb(self) -> str:
        if self.rng.random() < 0.5:
            return self.lang.verbs[self.zipf(self.topic_verbs)]
        return self.zipf(self.lang.verbs)

    @staticmethod
    def plural(noun: str) -> str:
        return noun + ("es" if noun.endswith(("s", "sh", "ch")) else "s")

    def noun_phrase(self, depth: int = 0) -> tuple[list[str], bool]:
        """Words and whether the phrase is plural."""
        r = self.rng.random()
        if r < 0.08:
            return [self.zipf(self.lang.names)], False
        plural = self.rng.random() < 0.35
        det = self.zipf(FUNCTION_WORDS["det_pl" if plural else "det_sg"])
        words = [self.zipf(self.lang.adjs)] if self.rng.random() < 0.35 else []
        head = self.noun()
        words.append(self.plural(head) if plural else head)
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        words.insert(0, det)
        if depth == 0 and self.rng.random() < 0.12:
            words += ["that"] + self.verb_phrase(plural, depth + 1)
        elif depth == 0 and self.rng.random() < 0.2:
            words += [self.zipf(FUNCTION_WORDS["prep"])] + self.noun_phrase(depth + 1)[0]
        return words, plural

    def verb_phrase(self, plural: bool, depth: int = 0) -> list[str]:
        v = self.verb()
        if self.past:
            form = v + ("d" if v.endswith("e") else "ed")
        else:
            form = v if plural else self.plural(v)
        words = [form]
        if self.rng.random() < 0.7:
            words += self.noun_phrase(depth + 1)[0]
        if self.rng.random() < 0.15:
            words.append(self.zipf(FUNCTION_WORDS["adv_time"]))
        return words

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.05:
            words = ["in", str(self.rng.randrange(1700, 2030)), ","]
        elif r < 0.08:
            words = [str(self.rng.randrange(2, 40)), "of", "the", self.plural(self.noun()), "were" if self.past
                     else "are", self.zipf(self.lang.adjs), "."]
            return " ".join(words).replace(" .", ".")
        else:
            words = []
        subject, plural = self.noun_phrase()
        words += subject + self.verb_phrase(plural)
        if self.rng.random() < 0.3:
            words += [self.zipf(FUNCTION_WORDS["prep"])] + self.noun_phrase(1)[0]
        if self.rng.random() < 0.15:
            subject, plural = self.noun_phrase(1)
            words += [self.zipf(FUNCTION_WORDS["conj"])] + subject + self.verb_phrase(plural, 1)
        text = " ".join(words).replace(" ,", ",")
        return text[0].upper() + text[1:] + "."

    def document(self) -> str:
        paragraphs = []
        for _ in range(1 + min(150, int(self.rng.expovariate(1 / 24)))):  # ~8k characters on average
            paragraphs.append(" ".join(self.sentence() for _ in range(self.rng.randint(2, 7))))
        return "\n\n".join(paragraphs)


def documents(n_chars: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    """Documents of the seed's language until at least `n_chars` characters are out."""
    lang, rng, total = Language(seed), random.Random(seed + 1), 0
    while total < n_chars:
        doc = _Writer(lang, random.Random(rng.getrandbits(64))).document()
        total += len(doc)
        yield doc


def write_corpus(path: str | Path, n_chars: int = 2_000_000, seed: int = 0) -> Path:
    """Write the generated documents as JSON lines ({"text": ...}), the format `train data --corpus` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for doc in documents(n_chars, seed):
            f.write(json.dumps({"text": doc}) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.synthetic_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file to write")
    parser.add_argument("--chars", type=int, default=2_000_000, help="at least this many characters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_corpus(args.out, args.chars, args.seed))


if __name__ == "__main__":
    main()

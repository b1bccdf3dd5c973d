"""Corpus -> tokenizer -> Parquet token shards with a manifest, and the readers for them.

Layout of a dataset directory:
    tokenizer/            PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json, ...)
    train-00000.parquet   one row per document: tokens (list<int32>, BOS ... EOS), doc_hash
    val-00000.parquet
    manifest.json         inputs, tokenizer hash, per-shard rows/tokens/sha256, split totals

The split is by document content hash, so the validation set is fixed for a corpus whatever the
budget or file order. Training documents are ordered by hash (a fixed shuffle), so a budget of D
tokens is the first D tokens of that stream: budgets are nested and every run sees the same ones.
With `chunk_tokens` set, each row is a chunk instead of a document: the training documents are cut
into chunks of that many tokens and the chunks shuffled together (seeded), so even a small budget
draws from many documents, and the validation set is one chunk from each validation document.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from plumbing.artifacts import ArtifactError, OutputLock, atomic_write_bytes, atomic_write_json, publish_file, sha256_file
from plumbing.artifacts import read_manifest as read_json_manifest
from plumbing.config_flags import setting
from train.corpus import CorpusError, corpus_files, read_documents

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "chorus.tokens.v1"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IGNORE_INDEX = -100
SHARD_TOKENS = 4_000_000  # per Parquet file: small enough to verify and stream, large enough to be few


class DataError(ArtifactError):
    """A dataset directory is inconsistent, corrupt, or too small for the request."""


@dataclass(frozen=True)
class DatasetSpec:
    corpus: tuple[str, ...] = setting(help="corpus files or directories (default: the built-in default corpus)")
    vocab_size: int = setting(4096, "BPE vocabulary size (default %(default)s)")
    val_fraction: float = setting(0.05, "share of documents held out (default %(default)g)")
    val_max_tokens: int = setting(100_000, "cap on validation tokens (default %(default)s)")
    max_chars: int | None = setting(None, "read at most this many characters of the corpus")  # large corpora
    tokenizer: str | None = setting(  # an existing model's tokenizer directory (continued pre-training); None: train one
        None, "use this Hugging Face model's (or tokenizer's) directory's tokenizer instead of training one: for "
              "continued pre-training of that model (--init-from); its tokenizer.json is copied as is, so the "
              "manifest's tokenizer hash matches the base")
    chunk_tokens: int | None = None  # rows are seeded-shuffled chunks of this many tokens, not whole documents
    chunk_seed: int = 0


def _doc_hash(doc: str) -> str:
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def _inputs_key(spec: DatasetSpec) -> dict:
    files = corpus_files(list(spec.corpus))
    # by content, not mtime: a corpus copied or unpacked again is still the same corpus
    stats = [(str(f.resolve()), f.stat().st_size, sha256_file(f)) for f in files]
    key = {"spec": asdict(spec), "files": stats}
    if not spec.tokenizer:
        del key["spec"]["tokenizer"]  # datasets made before the option existed stay the same dataset
    else:
        key["tokenizer_sha256"] = tokenizer_hash(_tokenizer_source(spec.tokenizer))
    if not spec.chunk_tokens:  # the same for whole-document datasets made before chunking existed
        del key["spec"]["chunk_tokens"], key["spec"]["chunk_seed"]
    return json.loads(json.dumps(key))  # as it reads back from the manifest


def _same_but_for_mtimes(recorded: dict, key: dict) -> bool:
    """A manifest written before datasets were keyed by content recorded (path, size, mtime_ns) per file."""
    files = recorded.get("files", [])
    rest = lambda inputs: {k: v for k, v in inputs.items() if k != "files"}  # spec, and a base tokenizer's hash
    return (rest(recorded) == rest(key) and len(files) == len(key["files"])
            and all(isinstance(old[2], int) and old[:2] == new[:2] for old, new in zip(files, key["files"])))


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE with BOS/EOS/PAD specials and a post-processor that prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )
    fast.save_pretrained(out_dir)
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_source(source: str | Path) -> Path:
    source = Path(source)
    if not (source / "tokenizer.json").is_file():
        raise DataError(f"--tokenizer {source}: no tokenizer.json there (a Hugging Face model or tokenizer directory "
                        "with a fast tokenizer is needed)")
    return source


def adopt_tokenizer(source: str | Path, out_dir: Path):
    """Use an existing model's tokenizer (a Hugging Face directory with tokenizer.json): its files are copied
    byte for byte, so the dataset's tokenizer_sha256 equals the base model's and a mismatch can be named.
    The tokenizer must define BOS and EOS (every document is stored as BOS ... EOS)."""
    source = _tokenizer_source(source)
    try:
        tokenizer = load_tokenizer(source)
    except Exception as e:  # transformers raises many kinds for a damaged directory
        raise DataError(f"--tokenizer {source}: cannot be loaded as a tokenizer ({e})") from e
    missing = [name for name in ("bos_token_id", "eos_token_id") if getattr(tokenizer, name) is None]
    if missing:
        raise DataError(f"--tokenizer {source}: the tokenizer defines no {' or '.join(m[:3].upper() for m in missing)} "
                        "token; Chorus stores every document as BOS ... EOS")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            atomic_write_bytes(out_dir / name, (source / name).read_bytes())
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    return sha256_file(Path(tokenizer_dir) / "tokenizer.json")


def _write_shards(out_dir: Path, split: str, token_lists: list[list[int]], hashes: list[str]) -> list[dict]:
    shards, start = [], 0
    while start < len(token_lists):
        end, count = start, 0
        while end < len(token_lists) and (count < SHARD_TOKENS or end == start):
            count += len(token_lists[end])
            end += 1
        name = f"{split}-{len(shards):05d}.parquet"
        table = pa.table(
            {
                "tokens": pa.array(token_lists[start:end], type=pa.list_(pa.int32())),
                "doc_hash": pa.array(hashes[start:end], type=pa.string()),
            }
        )
        tmp = out_dir / (name + ".tmp")
        pq.write_table(table, tmp)
        publish_file(tmp, out_dir / name)
        shards.append({"file": name, "rows": end - start, "tokens": count, "sha256": sha256_file(out_dir / name)})
        start = end
    return shards


def prepare_dataset(spec: DatasetSpec, out_dir: str | Path) -> dict:
    """Build (or reuse) the tokenizer and token shards for `spec` in `out_dir`; return the manifest."""
    with OutputLock(out_dir):
        return _prepare_dataset(spec, Path(out_dir))


def _prepare_dataset(spec: DatasetSpec, out_dir: Path) -> dict:
    manifest_path = out_dir / "manifest.json"
    key = _inputs_key(spec)
    if manifest_path.exists():
        manifest = read_manifest(out_dir)
        if manifest["inputs"] == key:
            log.info("dataset %s is up to date; reusing its shards", out_dir)
            return manifest
        if _same_but_for_mtimes(manifest["inputs"], key):
            log.warning("dataset %s was keyed by file mtimes, which changed; its corpus files have the same paths "
                        "and sizes, so it is reused and re-keyed by their sha256", out_dir)
            manifest["inputs"] = key
            atomic_write_json(manifest_path, manifest)
            return manifest
        raise DataError(
            f"{out_dir} holds a dataset built from other inputs; use another --data-dir or delete it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = list(tqdm(read_documents(list(spec.corpus), spec.max_chars), desc="reading corpus", unit="doc"))
    if not docs:
        raise CorpusError(f"corpus {list(spec.corpus)} holds no non-empty documents")
    hashes = [_doc_hash(d) for d in docs]
    # Deduplicate by content and order by hash: a fixed shuffle independent of file order.
    order = sorted({h: i for i, h in enumerate(hashes)}.items())
    cut = int(spec.val_fraction * 2**32)
    val = [(h, docs[i]) for h, i in order if int(h[:8], 16) < cut]
    train = [(h, docs[i]) for h, i in order if int(h[:8], 16) >= cut]
    if not val:  # tiny corpora: still hold out one document so validation is never empty
        val, train = train[:1], train[1:]
    if not train:
        raise CorpusError("corpus too small: need at least two distinct documents (one is held out for validation)")
    log.info("corpus: %d documents (%d train, %d validation)", len(order), len(train), len(val))

    tok_dir = out_dir / "tokenizer"
    if spec.tokenizer:
        tokenizer = adopt_tokenizer(spec.tokenizer, tok_dir)
        log.info("tokenizer: %s (vocabulary %d), adopted from %s", tok_dir, len(tokenizer), spec.tokenizer)
    else:
        tokenizer = train_tokenizer([d for _, d in train], spec.vocab_size, tok_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(split_docs):
        # Special tokens added by hand, not by the tokenizer's post-processor: a foreign tokenizer may add
        # none, or others; every document is stored as exactly BOS ... EOS either way.
        ids = []
        texts = [d for _, d in split_docs]
        for i in tqdm(range(0, len(texts), 256), desc="tokenizing", unit="batch"):
            enc = tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]
            ids.extend([bos] + e + [eos] for e in enc)
        return ids

    train_ids, val_ids = encode(train), encode(val)
    train_hashes, val_hashes = [h for h, _ in train], [h for h, _ in val]
    if spec.chunk_tokens:
        train_ids, train_hashes = shuffled_chunks(train_ids, train_hashes, spec.chunk_tokens, spec.chunk_seed)
        val_ids = one_chunk_each(val_ids, spec.chunk_tokens, spec.chunk_seed)
    # The validation set is capped, and the cap is part of the dataset: every run evaluates the same tokens.
    kept, total = [], 0
    for e in val_ids:
        if total >= spec.val_max_tokens:
            break
        kept.append(e[: spec.val_max_tokens - total])
        total += len(kept[-1])
    val_ids = kept
    manifest = {
        "format": MANIFEST_FORMAT,
        "inputs": key,
        "vocab_size": len(tokenizer),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        "tokenizer_sha256": tokenizer_hash(tok_dir),
        "splits": {
            "train": {"shards": _write_shards(out_dir, "train", train_ids, train_hashes)},
            "val": {"shards": _write_shards(out_dir, "val", val_ids, val_hashes[: len(val_ids)])},
        },
    }
    for split in manifest["splits"].values():
        split["tokens"] = sum(s["tokens"] for s in split["shards"])
        split["documents"] = sum(s["rows"] for s in split["shards"])
    atomic_write_json(manifest_path, manifest)  # the manifest appears last: its presence means the dataset is whole
    log.info(
        "dataset ready: %d train tokens, %d validation tokens, vocab %d",
        manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"], manifest["vocab_size"],
    )
    return manifest


def shuffled_chunks(token_lists: list[list[int]], hashes: list[str], chunk_tokens: int,
                    seed: int) -> tuple[list[list[int]], list[str]]:
    """Every document cut into chunks of `chunk_tokens` (its last one shorter), all chunks in one seeded order,
    each with its document's hash: a budget (a prefix of the stream) then spans many documents, not a few whole
    ones, and a larger budget extends a smaller one."""
    chunks = [(h, ids[i : i + chunk_tokens]) for ids, h in zip(token_lists, hashes)
              for i in range(0, len(ids), chunk_tokens)]
    order = np.random.default_rng(seed).permutation(len(chunks))
    return [chunks[i][1] for i in order], [chunks[i][0] for i in order]


def one_chunk_each(token_lists: list[list[int]], chunk_tokens: int, seed: int) -> list[list[int]]:
    """One chunk of `chunk_tokens` from each document, at a seeded offset: a fixed validation set that spans as
    many documents as the cap allows rather than the first few whole ones."""
    rng = np.random.default_rng(seed)
    starts = [int(rng.integers(0, max(1, len(ids) - chunk_tokens + 1))) for ids in token_lists]
    return [ids[s : s + chunk_tokens] for ids, s in zip(token_lists, starts)]


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    return read_json_manifest(path, MANIFEST_FORMAT, "Chorus token manifest",
                              f"no dataset at {data_dir}: {path} is missing (run `python -m train data` first)", DataError)


def concat_tokens(pieces: Iterable[np.ndarray], max_tokens: int | None = None) -> np.ndarray:
    """The pieces concatenated into one int32 stream, reading no more pieces than `max_tokens` needs."""
    parts, total = [], 0
    for piece in pieces:
        parts.append(piece)
        total += len(piece)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return stream[:max_tokens] if max_tokens is not None else stream


def load_tokens(data_dir: str | Path, split: str, max_tokens: int | None = None, verify: bool = True) -> np.ndarray:
    """The split's token stream (documents concatenated, each BOS ... EOS), truncated to `max_tokens`.

    Asking for more training tokens than the split holds is an error, never a silent shortfall.
    Every shard read is checked against the manifest's sha256: a corrupt file is named, not used.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    info = manifest["splits"][split]
    if max_tokens is not None and max_tokens > info["tokens"]:
        raise DataError(
            f"budget of {max_tokens:,} tokens exceeds the {split} split of {data_dir} ({info['tokens']:,} tokens); "
            "use a smaller budget or a larger corpus"
        )

    return read_token_stream([(data_dir / s["file"], s["sha256"]) for s in info["shards"]], max_tokens, verify)


# ---- token shards: the one reader ---------------------------------------------------------------
# A token shard is a Parquet file of one sequence per row in a `tokens` column (list<int32>, BOS first), listed with
# its sha256 in a manifest: this dataset's splits, and synthdata's synthetic shards (synthdata.loader.TokenShards).

def check_shard(path: Path, sha256: str) -> None:
    """The shard exists and its bytes are the ones its manifest records; else a DataError naming it."""
    if not path.exists() or sha256_file(path) != sha256:
        raise DataError(f"token shard {path} is missing or corrupt (sha256 differs from the manifest)")


def shard_tokens(path: Path) -> np.ndarray:
    """One shard's rows concatenated into one int32 stream."""
    column = pq.read_table(path, columns=["tokens"]).column("tokens").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).astype(np.int32)


def shard_rows(path: Path) -> Iterator[np.ndarray]:
    """One shard's rows (int32 token arrays), streamed one record batch at a time."""
    for batch in pq.ParquetFile(path).iter_batches(columns=["tokens"]):
        column = batch.column("tokens")
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int32)
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield values[a:b]


def read_token_stream(shards: Iterable[tuple[Path, str]], max_tokens: int | None = None,
                      verify: bool = True) -> np.ndarray:
    """The (path, sha256) shards' rows concatenated in order, truncated to `max_tokens`; a shard is read (and, with
    `verify`, checked against its sha256) only if the budget needs it."""
    def streams():
        for path, sha256 in shards:
            if verify:
                check_shard(path, sha256)
            yield shard_tokens(path)

    return concat_tokens(streams(), max_tokens)


def windows(stream: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into (inputs, targets) windows of `context` tokens.

    Window i reads stream[i*context : i*context + context + 1], so every token but the first is a
    target exactly once. The last window is padded; its pad targets are IGNORE_INDEX.
    """
    n_targets = len(stream) - 1
    if n_targets < 1:
        raise DataError("token stream too short: need at least two tokens")
    n = -(-n_targets // context)
    padded = np.full(n * context + 1, IGNORE_INDEX, dtype=np.int64)
    padded[: len(stream)] = stream
    inputs = np.lib.stride_tricks.sliding_window_view(padded[:-1], context)[::context].copy()
    targets = np.lib.stride_tricks.sliding_window_view(padded[1:], context)[::context].copy()
    inputs[inputs == IGNORE_INDEX] = 0  # padded inputs only feed padded targets under causal attention
    return inputs, targets

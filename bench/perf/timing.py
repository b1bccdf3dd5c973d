"""How the perf scripts time contenders: in repeats whose order alternates, an engine each time in a fresh process,
each figure the median of its repeats with their spread; and their command lines, whose --help opens with the
script's docstring."""
from __future__ import annotations

import argparse
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator

import numpy as np


def perf_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m bench.perf.<name>`."""
    return argparse.ArgumentParser(prog=f"python -m bench.perf.{name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def interleaved(contenders: Iterable[str], repeats: int) -> Iterator[tuple[int, int, str]]:
    """(repeat, position in that repeat, contender) of every run, in the order to run them: the contenders go forward
    in even repeats and reversed in odd ones, so that none always runs first on a box whose load drifts."""
    names = list(contenders)
    for repeat in range(repeats):
        for position, name in enumerate(names if repeat % 2 == 0 else names[::-1]):
            yield repeat, position, name


def median_spread(values: list[float]) -> dict:
    """A figure from its repeats: the median, and the spread [min, max]."""
    return {"median": float(np.median(values)), "spread": [min(values), max(values)]}


def _put_result(queue, fn: Callable, args: tuple) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn: Callable, *args):
    """What `fn(*args)` returns, run in a fresh (spawned) process: no engine, allocator or cache of an earlier
    contender's is left in it, and the engine it starts ends with it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_put_result, args=(queue, fn, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result

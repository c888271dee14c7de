"""Random streams of a run with several processes: the same initial weights on every rank, then
each rank its own noise.

    run = start_run(args, ...)                        # each rank's own stream, from (seed, rank)
    with same_init_on_every_rank(args.seed):          # every rank draws the same here:
        model = build_model()                         # identical initial weights (frozen parts too)
    # here each rank draws its own timesteps, noise, shot counts, ... from (seed, rank) again

Checkpoints store every rank's states (`rng_states`) and give each rank its own back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .distributed import _rank


def rank_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s own stream in a run seeded `seed`: `seed` itself on rank 0 (a
    one-process run is rank 0 of any run), a 63-bit hash of (seed, rank) on the others, so that
    no two ranks, and no rank of one run and another seed's run, share a stream (`seed + rank`
    would give rank 1 of seed 0 the stream of rank 0 of seed 1)."""
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
    if rank == 0:
        return seed
    words = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63: a valid torch seed


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device) with
    `rank_seed(seed, rank)`: `rank`'s own stream of the run seeded `seed`."""
    seed = rank_seed(seed, rank)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def same_init_on_every_rank(seed: int) -> Iterator[None]:
    """Build the models in this block: every rank seeds its RNGs with `seed` on entering, so every
    random initialisation (and anything else drawn inside, e.g. a demo's pre-training) comes out
    the same on all ranks, as DDP and frozen models need. On leaving, normally or not, each rank's
    own stream restarts from (`seed`, rank) (`seed_everything(seed, rank)`): the training noise,
    timesteps and picks that follow differ between ranks, and do not depend on how much the
    block drew. DDP broadcasts rank 0's trained weights anyway; this also covers frozen modules."""
    seed_everything(seed)
    try:
        yield
    finally:
        seed_everything(seed, _rank())


def rng_states() -> dict:
    """This process's global RNG states (python, numpy, torch CPU, the current CUDA device) as
    JSON-able data, for `set_rng_states` (checkpoints store every rank's)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": (
            base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
            if torch.cuda.is_available()
            else None
        ),
    }


def set_rng_states(state: dict) -> None:
    """Restore what `rng_states` returned (the CUDA state where both have CUDA)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def reseed_from(states: list[dict], rank: int) -> None:
    """A stream for `rank` that no rank of the run that saved `states` (every rank's
    `rng_states`) drew from: `seed_everything` with a hash of those states and `rank`. For a
    resume with another number of processes, where the saved streams cannot be handed out one
    per rank; the same checkpoint and world size always give the same streams."""
    digest = hashlib.sha256(json.dumps(states, sort_keys=True).encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little") >> 1, rank)


def _bytes_tensor(b64: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, register_random, settings

# Property tests run tiny models on 2 CPU cores: few examples, no per-example deadline.
settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # pytest -n 2 runs two workers on two cores


class _TorchGlobalRNG:
    """torch's global generator in the shape `hypothesis.register_random` takes, so that hypothesis
    seeds it for every example and restores it after, as it does for `random` and numpy: a failing
    example then replays with the same module initialisations and global draws."""

    seed = staticmethod(torch.manual_seed)
    getstate = staticmethod(torch.get_rng_state)
    setstate = staticmethod(torch.set_rng_state)


_TORCH_RNG = _TorchGlobalRNG()  # register_random keeps only a weak reference
register_random(_TORCH_RNG)


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG states (torch, numpy, random), whichever tests
    ran before it in its worker: module initialisations and any global draw replay exactly. Tests
    still draw their data from their own seeded generators."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(items):
    """Slow tests first (a stable sort: the rest keep their order). With `-n 2 --dist worksteal`
    (the README's command) the long ones start at once and the short ones fill both workers
    around them, instead of one worker running minute-long tests one by one at the end while
    the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def cpu_only(monkeypatch):
    """Run a recipe on the CPU even where CUDA is present: bit-exact resume is a CPU property. CUDA
    kernels are not bitwise reproducible (two fresh QueryDiff demo runs on an H100 differed by 0.02
    in their weights after 2 AdamW steps, deterministic algorithms on or off)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def shared_dir() -> Path:
    """`../shared` beside the checkout; tests that need it skip cleanly where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED

"""Shared fixtures: a private PWS_BATCH_HOME holding the tiny model set, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def pws_home(tmp_path_factory) -> str:
    """PWS_BATCH_HOME for the session (so `--models tiny` builds into a temp dir, never ~/.cache)."""
    home = str(tmp_path_factory.mktemp("pws-home"))
    os.environ["PWS_BATCH_HOME"] = home
    return home


@pytest.fixture(scope="session")
def tiny_models(pws_home) -> str:
    """The tiny model set's folder, built once for the session through the real builder."""
    from pws_batch.core.models import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    """The generation pipeline on the tiny models, loaded once for the session (CPU, fp32)."""
    from pws_batch.core.pipeline import ImagesThatSoundPipeline

    return ImagesThatSoundPipeline.from_model_set("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for the tests of one module (shut down after them if this fixture started it)."""
    from pws_batch.batch import engine

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = engine.connect_ray(None, num_cpus=2)
    yield
    if started:
        import ray

        ray.shutdown()

"""A hub dataset name fails at once, in one line, when offline, unless it is in the local cache."""

import time

import pytest

from preftune.data import DataError, loading, sources


@pytest.mark.parametrize("why", ["env", "unreachable"])
def test_hub_name_fails_fast_offline(why, monkeypatch):
    import datasets  # noqa: F401  (imported outside the timing)

    calls = []
    if why == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setattr(sources, "_hub_reachable", lambda: calls.append(1) or False)
    started = time.perf_counter()
    with pytest.raises(DataError) as error:
        loading.load_examples("some-org/some-dataset-that-is-not-cached")
    assert time.perf_counter() - started < 5  # no network retries
    message = str(error.value)
    assert "\n" not in message and message.startswith("some-org/some-dataset-that-is-not-cached")
    assert "not in the local datasets cache" in message
    assert ("HF_HUB_OFFLINE=1" in message) if why == "env" else ("unreachable" in message and calls)


def test_offline_mode_is_restored_after_a_load(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    before = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError):
        loading.load_examples("some-org/other")
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == before

"""Tokenizer training sets its own thread count; what runs after it in the same process must get its own back."""

import torch

from omnitok.tokenizers.base import torch_threads


def test_torch_threads_restores_after_error():
    before = torch.get_num_threads()
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before


def test_torch_threads_none_leaves_count():
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_auto_threads_counts_cores_busy_now_not_the_load_average(monkeypatch):
    import itertools

    from omnitok.tokenizers import base

    monkeypatch.setattr(base.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(base.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(base.time, "sleep", lambda s: None)
    # a pipeline's previous step kept all 4 cores busy for the last minute, but it has ended: the load average
    # still says 4, the CPU times sampled now say idle
    monkeypatch.setattr(base.os, "getloadavg", lambda: (4.0, 4.0, 4.0))
    samples = itertools.cycle([(0.0, 0.0), (400.0, 400.0)])  # (idle, total) jiffies: all of it idle
    monkeypatch.setattr(base, "_cpu_times", lambda: next(samples))
    assert base.auto_threads() == 4
    # another process holds 3 of the 4 cores right now: one thread for us
    samples = itertools.cycle([(0.0, 0.0), (100.0, 400.0)])
    monkeypatch.setattr(base, "_cpu_times", lambda: next(samples))
    assert base.busy_cores() == 3.0
    assert base.auto_threads() == 1
    # no /proc/stat: the load average is what there is
    monkeypatch.setattr(base, "_cpu_times", lambda: None)
    monkeypatch.setattr(base.os, "getloadavg", lambda: (2.2, 1.0, 1.0))
    assert base.auto_threads() == 2

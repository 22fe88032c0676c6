"""Steps pick their thread count from the cores free as they start, and give the caller its own count back."""

import torch

from omnitok.threads import torch_threads


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

    from omnitok import threads as base

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


def test_free_cores_runs_a_block_on_the_cores_not_busy_and_gives_the_count_back(monkeypatch):
    from omnitok import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.9)  # another process holds one of the two cores
    seen = []
    monkeypatch.setattr(threads.torch, "set_num_threads", seen.append)
    with threads.free_cores() as n:
        assert n == 1 and seen == [1]
    assert seen == [1, 2]  # the count it found is restored
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.3)  # idle but for noise: every core
    with threads.free_cores() as n:
        assert n == 2
    monkeypatch.undo()
    assert torch.get_num_threads() == before


def _threads_now() -> int:
    return torch.get_num_threads()


def _fake_busy(monkeypatch) -> None:
    """The machine has one core fewer free than torch's count (at least one thread is left)."""
    from omnitok import threads

    monkeypatch.setattr(threads, "auto_threads", lambda: max(1, torch.get_num_threads() - 1))


def test_the_demo_s_steps_and_the_heavy_commands_run_on_free_cores(monkeypatch, tmp_path):
    from pathlib import Path

    from omnitok import demo

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _fake_busy(monkeypatch)
        # the demo's fresh-process steps (the wrapper the child runs)
        assert demo._on_free_cores(_threads_now) == 1
        assert torch.get_num_threads() == 2

        seen: dict[str, int] = {}

        def record(name, result=None):
            def fn(*args, **kwargs):
                seen[name] = torch.get_num_threads()
                return result

            return fn

        # omnitok train
        import omnitok.train.loop as loop
        import omnitok.train.recipe as recipe_mod
        from omnitok.train.cli import train as train_cmd

        monkeypatch.setattr(recipe_mod, "check_data", lambda r: 0)
        monkeypatch.setattr(loop, "stage_summary", lambda r: [{"stage": "align"}])
        monkeypatch.setattr(loop, "train", record("train", {"log": [], "final": None, "step": 0}))
        recipe = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
        train_cmd(recipe, out=tmp_path / "run", data=tmp_path, resume=None, progress=False, max_steps=None)
        # omnitok pretokenize
        import omnitok.data.pretokenize as pre
        from omnitok.data.cli import pretokenize as pretokenize_cmd

        monkeypatch.setattr(pre, "pretokenize", record("pretokenize", {}))
        pretokenize_cmd(
            data=tmp_path, out=tmp_path / "tokens", image_tokenizer=tmp_path, speech_tokenizer=None,
            text_tokenizer=None, tasks=None, splits="train", text_vocab_size=300, seed=0,
        )  # fmt: skip
        # omnitok eval
        import omnitok
        import omnitok.eval.suite as suite
        from omnitok.eval.cli import eval_command

        monkeypatch.setattr(omnitok, "load", lambda *a, **k: object())
        monkeypatch.setattr(suite, "evaluate", record("eval", {}))
        eval_command(
            tmp_path, data=tmp_path, out=tmp_path / "eval", limit=1, tasks=None, seed=0, max_minutes=None,
            temperature=None, top_k=None, top_p=None, device="cpu", t2i_best_of=1, caption_best_of=1,
            tts_best_of=1, spoken_qa_best_of=1,
        )  # fmt: skip
        assert seen == {"train": 1, "pretokenize": 1, "eval": 1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

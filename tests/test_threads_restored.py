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

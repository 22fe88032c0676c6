"""Per-document attention over packed rows (``attention: packed``) against the dense block-diagonal mask."""

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from omnitok.data.packing import pack_rows
from omnitok.errors import OmnitokError
from omnitok.model import build_model
from omnitok.train.attention import NAME, DocumentSpans, packed_attention
from omnitok.train.loop import Runtime, _attention, _forward_loss, train
from omnitok.train.recipe import parse_recipe
from omnitok.train.synthetic import write_synthetic_tokens
from tiny_models import TINY_LLAMA as TINY

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False, owns_group=False)


def packed_batch(lengths_by_row, seq_len=64, vocab=96):
    """Rows of whole documents of the given lengths (a row's tail is padding, its own segment)."""
    torch.manual_seed(1)
    docs, rows, k = [], [], 0
    for lengths in lengths_by_row:
        row = []
        for n in lengths:
            ids = torch.randint(0, vocab, (n,)).numpy()
            docs.append((ids, (torch.arange(n) > 0).to(torch.uint8).numpy()))
            row.append(("a", k))
            k += 1
        rows.append(row)
    return pack_rows(rows, {"a": docs}, seq_len=seq_len)


def test_packed_attention_equals_the_dense_mask_in_loss_and_gradients():
    # documents of 1 token, of exactly the granularity, longer than it, a full row, and padded rows
    batch = packed_batch([[1, 8, 9, 20], [64], [3, 17, 5]])
    torch.manual_seed(0)
    dense = build_model(TINY, vocab_size=96)
    packed = copy.deepcopy(dense)
    packed.config._attn_implementation = NAME

    loss_mask = _forward_loss(dense, batch, CPU, "mask")
    loss_packed = _forward_loss(packed, batch, CPU, "packed")
    # what the test can see: attention leaking across documents (spans of one document a row) changes the loss
    leak = _forward_loss(copy.deepcopy(packed), replace(batch, doc_ids=torch.zeros_like(batch.doc_ids)), CPU, "packed")
    assert abs(leak.item() - loss_mask.item()) > 1e-5 * abs(loss_mask.item())  # 5e-5 here; the kernels agree to 1e-6
    loss_mask.backward()
    loss_packed.backward()
    assert batch.targets > 0
    assert loss_packed.item() == pytest.approx(loss_mask.item(), rel=1e-6)
    for a, b in zip(dense.parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_document_spans_group_documents_by_padded_length():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]])
    spans = DocumentSpans(doc_ids, granularity=4)
    assert spans.positions == 16
    got = {g.length: (g.n, sorted(g.dest.tolist())) for g in spans.groups}
    assert got == {4: (3, [0, 1, 2, 3, 4, 5, 6, 7]), 8: (1, list(range(8, 16)))}
    # grouped where the ids are (the host), indices handed to the model's device
    on_meta = DocumentSpans(doc_ids, granularity=4, device=torch.device("meta"))
    assert {t.device.type for g in on_meta.groups for t in (g.gather, g.real, g.dest)} == {"meta"}
    # ids restart in every row: a row that ends in document 0 and the next that starts with it are two documents
    spans = DocumentSpans(torch.zeros(2, 8, dtype=torch.long), granularity=4)
    assert [(g.length, g.n) for g in spans.groups] == [(8, 2)]
    with pytest.raises(OmnitokError, match=r"doc_ids: expected \[rows, length\]"):
        DocumentSpans(torch.zeros(8, dtype=torch.long))


def test_without_spans_the_kernel_is_plain_sdpa_and_rejects_what_it_cannot_do():
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=96)
    ids = torch.randint(0, 96, (2, 12))
    expected = model(input_ids=ids).logits
    model.config._attn_implementation = NAME  # generation while training, say: no spans, ordinary causal attention
    torch.testing.assert_close(model(input_ids=ids).logits, expected)

    q = torch.zeros(1, 4, 8, 8)
    kv = torch.zeros(1, 2, 8, 8)
    spans = DocumentSpans(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(OmnitokError, match=r"sliding_window.*attention: mask"):
        packed_attention(None, q, kv, kv, None, document_spans=spans, sliding_window=4)
    with pytest.raises(OmnitokError, match="made for 8 positions, the batch has 16"):
        packed_attention(
            None, torch.zeros(2, 4, 8, 8), kv.repeat(2, 1, 1, 1), kv.repeat(2, 1, 1, 1), None, document_spans=spans
        )


def test_auto_is_packed_on_cpu_and_flash_models_keep_their_own_way():
    model = build_model(TINY, vocab_size=96)
    r = SimpleNamespace(attention="auto")
    assert _attention(model, r, CPU) == "packed" and model.config._attn_implementation == NAME
    model = build_model(TINY, vocab_size=96)
    assert _attention(model, SimpleNamespace(attention="mask"), CPU) == "mask"
    assert model.config._attn_implementation == "sdpa"
    gpu = Runtime(rank=0, world=1, device=torch.device("cuda"), bf16=False, owns_group=False)
    assert _attention(model, r, gpu) == "mask"

    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert _attention(flash, r, CPU) == "flash"
    with pytest.raises(OmnitokError, match="attention: 'packed' is for sdpa or eager models"):
        _attention(flash, SimpleNamespace(attention="packed"), CPU)


def test_recipe_names_a_bad_attention():
    raw = {
        "name": "t",
        "data": "x",
        "out": "y",
        "model": TINY,
        "batch": {"seq_len": 64, "micro_batch": 2},
        "optim": {"lr": 1e-3},
        "attention": "blocky",
        "stages": [{"name": "s", "steps": 1, "mixture": {"a": 1.0}}],
    }
    with pytest.raises(OmnitokError, match=r"attention: expected one of \['auto', 'packed', 'mask'\], got 'blocky'"):
        parse_recipe(raw)


def test_a_run_trains_alike_with_either_attention_and_saves_an_ordinary_model(tmp_path):
    data = tmp_path / "tokens"
    write_synthetic_tokens(data, vocab_size=96, tasks={"caption": (4, 20), "asr": (10, 50)}, docs=30)

    def run(attention):
        out = tmp_path / attention
        recipe = parse_recipe(
            {
                "name": "t",
                "seed": 3,
                "data": str(data),
                "out": str(out),
                "model": TINY,
                "attention": attention,
                "batch": {"seq_len": 64, "micro_batch": 2},
                "optim": {"lr": 1e-2, "warmup_steps": 1},
                "log": {"every": 1, "tensorboard": False},
                "stages": [{"name": "s", "steps": 4, "mixture": {"caption": 0.5, "asr": 0.5}}],
            }
        )
        train(recipe, progress=False)
        log = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        return log, json.loads((out / "final" / "config.json").read_text())

    mask_losses, _ = run("mask")
    packed_losses, config = run("packed")
    # The first loss is before any update: the same forward pass. Later ones drift apart by float rounding only,
    # which AdamW's normalised steps amplify (~1e-3 after three steps).
    assert packed_losses[0] == pytest.approx(mask_losses[0], rel=1e-6)
    assert packed_losses == pytest.approx(mask_losses, rel=1e-2)
    assert NAME not in json.dumps(config)  # the saved model loads anywhere, with the library's own kernels

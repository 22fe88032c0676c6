import json

import numpy as np
import pytest

from omnitok.data.shards import ShardWriter, TokenDataset, load_manifest, read_vocab_size, write_manifest
from omnitok.errors import OmnitokError


def _docs(rng, n, vocab=100):
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 30))
        out.append((rng.integers(0, vocab, length), rng.integers(0, 2, length)))
    return out


def test_roundtrip_across_shards_and_manifest(tmp_path, rng):
    docs = _docs(rng, 25)
    infos = []
    for rank in range(3):
        w = ShardWriter(tmp_path, "train", "caption", rank)
        for ids, mask in docs[rank::3]:
            w.add(ids, mask)
        infos.append(w.close())
    assert infos[0] == {"docs": 9, "tokens": sum(len(d[0]) for d in docs[0::3]), "prefix": "train/caption/shard-00000"}
    manifest = write_manifest(tmp_path, vocab_size=100)
    assert manifest == load_manifest(tmp_path)
    entry = manifest["splits"]["train"]["caption"]
    assert entry["docs"] == 25 and entry["tokens"] == sum(len(d[0]) for d in docs)
    assert entry["shards"] == [f"train/caption/shard-0000{r}" for r in range(3)]

    ds = TokenDataset(tmp_path, "train", "caption")
    assert len(ds) == 25 and ds.num_tokens == entry["tokens"]
    order = [d for r in range(3) for d in docs[r::3]]  # shard order, then document order
    for i, (ids, mask) in enumerate(order):
        got_ids, got_mask = ds[i]
        assert got_ids.dtype == np.int64 and got_mask.dtype == np.uint8
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_mask, mask)
        assert ds.lengths[i] == len(ids)
    np.testing.assert_array_equal(ds[-1][0], order[-1][0])
    with pytest.raises(IndexError):
        ds[25]


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        ([1, 2, 3], [1, 1], "ids has 3 tokens but mask has 2"),
        ([1, -2], [1, 1], "ids must be in"),
        ([1, 2], [1, 2], "mask values must be 0 or 1"),
        ([], [], "empty document"),
        ([[1, 2]], [[1, 1]], "must be 1-D"),
        ([1.5, 2], [1, 1], "must be integers"),
    ],
)
def test_writer_rejects_bad_documents(tmp_path, ids, mask, message):
    w = ShardWriter(tmp_path, "train", "t2i")
    with pytest.raises(OmnitokError, match=message):
        w.add(ids, mask)


def test_bad_names(tmp_path):
    with pytest.raises(OmnitokError, match="task name"):
        ShardWriter(tmp_path, "train", "../escape")
    with pytest.raises(OmnitokError, match="split name"):
        ShardWriter(tmp_path, "", "caption")


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", "asr") as w:
        w.add([1, 2, 3], [0, 1, 1])
        raise RuntimeError("tokenizer crashed")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_crash_during_close_leaves_no_complete_shard(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, "train", "asr")
    w.add([1, 2, 3], [0, 1, 1])
    real_save = np.save
    calls = []

    def failing_save(f, arr, **kw):
        calls.append(arr.dtype)
        if len(calls) == 2:  # ids written, mask fails (disk full, kill, ...)
            raise OSError("disk full")
        real_save(f, arr, **kw)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError):
        w.close()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert write_manifest(tmp_path, 10)["splits"] == {}


def test_manifest_ignores_incomplete_and_checks_vocab(tmp_path):
    w = ShardWriter(tmp_path, "train", "tts")
    w.add([5, 6, 7], [0, 1, 1])
    w.close()
    (tmp_path / "train" / "tts" / "shard-00001.ids.npy").write_bytes(b"partial")  # no offsets: not a shard
    assert write_manifest(tmp_path, 8)["splits"]["train"]["tts"]["shards"] == ["train/tts/shard-00000"]
    with pytest.raises(OmnitokError, match="holds id 7 >= vocab_size 7"):
        write_manifest(tmp_path, 7)


def test_inconsistent_shard_is_named(tmp_path):
    w = ShardWriter(tmp_path, "train", "tts")
    w.add([5, 6, 7], [0, 1, 1])
    w.close()
    np.save(tmp_path / "train" / "tts" / "shard-00000.mask.npy", np.zeros(2, np.uint8))
    with pytest.raises(OmnitokError, match="shard-00000 is inconsistent"):
        write_manifest(tmp_path, 10)


def test_load_manifest_errors(tmp_path):
    with pytest.raises(OmnitokError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(OmnitokError, match=r"manifest\.json is missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "omnitok-world"}))
    with pytest.raises(OmnitokError, match="'format' should be 'omnitok-tokens'"):
        load_manifest(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"size": "big"}))
    with pytest.raises(OmnitokError, match="'size' should be a positive integer"):
        read_vocab_size(tmp_path)


def test_dataset_names_missing_task(tmp_path):
    w = ShardWriter(tmp_path, "train", "caption")
    w.add([1], [1])
    w.close()
    write_manifest(tmp_path, 10)
    with pytest.raises(OmnitokError, match=r"no task 'tts'; has \['caption'\]"):
        TokenDataset(tmp_path, "train", "tts")


def test_empty_shard_is_valid(tmp_path):
    assert ShardWriter(tmp_path, "val", "edit", 3).close() == {"docs": 0, "tokens": 0, "prefix": "val/edit/shard-00003"}
    assert write_manifest(tmp_path, 10)["splits"]["val"]["edit"] == {
        "docs": 0,
        "tokens": 0,
        "shards": ["val/edit/shard-00003"],
    }
    assert len(TokenDataset(tmp_path, "val", "edit")) == 0

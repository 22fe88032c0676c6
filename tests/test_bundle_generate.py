"""Bundles save and load whole; generation returns well-formed segments in the requested modality."""

import functools
import importlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import omnitok
from omnitok.bundle import save_bundle
from omnitok.errors import OmnitokError
from omnitok.generate import AudioChunk, ImageOut, TextDelta
from omnitok.sequence import Image, Text
from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from omnitok.tokenizers.text import TextTokenizer
from omnitok.vocab import Vocabulary


def _lm(vocab: Vocabulary) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab.size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    )


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    text = TextTokenizer.train(["a large red circle in the top left", "draw a small star"] * 20, vocab_size=280)
    text.save(root / "text")
    img = ImageTokenizer(ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4)))
    img.save(root / "image")
    vocab = Vocabulary.build(text.vocab_size, {"image": img.codebook_size})
    save_bundle(root / "bundle", _lm(vocab), vocab, root / "text", root / "image")
    tv = Vocabulary.build(text.vocab_size, {})
    save_bundle(root / "textonly", _lm(tv), tv, root / "text")
    return root


def test_bundle_layout_and_round_trip(bundle_dir):
    b = bundle_dir / "bundle"
    manifest = json.loads((b / "omnitok.json").read_text())
    assert manifest["format"] == "omnitok-bundle" and set(manifest["tokenizers"]) == {"text", "image"}
    assert (b / "lm" / "model.safetensors").exists() and (b / "tokenizers" / "image" / "model.safetensors").exists()
    assert not list(bundle_dir.glob(".*tmp*"))
    model = omnitok.load(str(b))
    assert model.vocab.size == model.lm.get_input_embeddings().weight.shape[0]


def test_text_and_image_outputs(bundle_dir):
    model = omnitok.load(str(bundle_dir / "bundle"))
    picture = np.zeros((64, 64, 3), np.uint8)
    out = model.generate([Image(pixels=picture), Text("what is this?")], output="text", max_new_tokens=6, seed=0)
    assert out and all(isinstance(s, Text) and s.role == "assistant" for s in out)
    out = model.generate([Text("a large red circle in the top left")], output="image", seed=0, cfg_scale=2.0)
    images = [s for s in out if isinstance(s, Image)]
    assert len(images) == 1 and images[0].pixels.shape == (64, 64, 3) and images[0].pixels.dtype == np.uint8
    batch = model.generate_batch([[Text("draw a small star")], [Text("a large red circle")]], output="image", seed=1)
    assert all(isinstance(r[0], Image) and r[0].pixels.shape == (64, 64, 3) for r in batch)
    # a seed draws on the LM's device (CUDA's sampler refuses a CPU generator), and repeats its output there
    assert model._generator(None) is None
    assert model._generator(3).device == next(model.lm.parameters()).device
    again = model.generate_batch([[Text("draw a small star")], [Text("a large red circle")]], output="image", seed=1)
    assert all(np.array_equal(a[0].pixels, b[0].pixels) for a, b in zip(batch, again, strict=True))


def test_guided_images_keep_the_pictures_of_the_prompt(bundle_dir, monkeypatch):
    """Editing a picture with guidance on (the API default): the unconditional row holds the picture, coded once."""
    import omnitok.generate as generate

    model = omnitok.load(str(bundle_dir / "bundle"))
    picture = np.zeros((64, 64, 3), np.uint8)
    request = [Image(pixels=picture), Text("make it red")]
    coded, encode_media = [], model.media  # count the pictures tokenized

    def media(batch):
        coded.extend(s for segs in batch for s in segs if isinstance(s, Image))
        return encode_media(batch)

    rows, decode = [], generate.iter_decode

    def iter_decode(lm, prompts, constraint, cfg, uncond, gen):
        rows.append((prompts, uncond))
        return decode(lm, prompts, constraint, cfg, uncond, gen)

    model.media = media
    monkeypatch.setattr(generate, "iter_decode", iter_decode)
    out = model.generate(request, output="image", seed=0, cfg_scale=3.0)
    assert [type(s) for s in out] == [Image] and out[0].pixels.shape == (64, 64, 3)
    assert len(coded) == 1 and coded[0].codes is not None and request[0].codes is None
    (cond,), (uncond,) = rows[0]
    codes = [t for t in uncond.tolist() if model.vocab.kind(t) == "image"]
    assert len(codes) == model.image_tokens and len(uncond) < len(cond)  # the picture, not the instruction's text
    assert codes == [t for t in cond.tolist() if model.vocab.kind(t) == "image"]
    doc = [Text("step one", role=None), Image(pixels=picture, role=None), Text("step two", role=None)]
    (img,) = model.generate(doc, output="image", continuation=True, seed=0, cfg_scale=2.0)
    assert img.pixels.shape == (64, 64, 3)


def test_best_of_keeps_the_picture_read_back_likeliest(bundle_dir):
    from omnitok.generate import BEST_OF_SAMPLING

    model = omnitok.load(str(bundle_dir / "bundle"))
    requests = [[Text("a large red circle in the top left")], [Text("draw a small star")]]
    best = model.generate_batch(requests, output="image", seed=5, best_of=3)
    # the candidates it chose among: the plain drawing, then 2 samples a request, drawn together seeded after it
    plain = model.generate_batch(requests, output="image", seed=5)
    twice = [r for r in requests for _ in (1, 2)]
    sampled = model.generate_batch(twice, output="image", seed=6, image=BEST_OF_SAMPLING)
    captions = ["a large red circle in the top left", "draw a small star"]
    for i, reply in enumerate(best):
        candidates = [plain[i], *sampled[2 * i : 2 * i + 2]]
        scores = model._read_back(candidates, [captions[i]] * 3)
        assert all(np.isfinite(x) and x < 0 for x in scores)
        assert np.array_equal(reply[0].codes, candidates[max(range(3), key=scores.__getitem__)][0].codes)
    assert not np.array_equal(sampled[0][0].codes, sampled[1][0].codes)  # a request's samples differ

    # score: the assistant turn's summed token log-probabilities, the same alone as in a padded batch
    from omnitok.sequence import encode

    ask = [Image(pixels=np.zeros((64, 64, 3), np.uint8)), Text("Describe the picture.", role="user")]
    short, long = [*ask, Text("a star", role="assistant")], [*ask, Text("a large red circle", role="assistant")]
    both = model.score([short, long])
    coded = [replace(s) for s in long]
    model.media([coded])
    enc = encode(coded, model.vocab, model.bundle.text)
    with torch.no_grad():
        logp = model.lm(input_ids=torch.as_tensor(enc.ids)[None]).logits[0, :-1].float().log_softmax(-1)
    by_hand = logp.gather(-1, torch.as_tensor(enc.ids[1:])[:, None])[:, 0][
        torch.as_tensor(enc.mask[1:], dtype=torch.bool)
    ]
    assert both[1] == pytest.approx(float(by_hand.sum()), abs=1e-3) and model.score([short]) == pytest.approx(both[:1])
    assert short[0].codes is None  # the caller's segments are left as they were
    with pytest.raises(OmnitokError, match="no segment with role 'assistant'"):
        model.score([ask])

    with pytest.raises(OmnitokError, match="best_of must be an int >= 1"):
        model.generate(requests[0], output="image", best_of=0)
    with pytest.raises(OmnitokError, match="best_of applies to text-to-image"):
        model.generate(requests[0], output="auto", best_of=2)
    with pytest.raises(OmnitokError, match="describing one picture"):
        model.generate(requests[0], output="text", continuation=True, best_of=2)
    with pytest.raises(OmnitokError, match="descriptions of one picture; request 0 holds 0 pictures"):
        model.generate(requests[0], output="text", best_of=2)
    picture = Image(pixels=np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(OmnitokError, match="request 1 holds 2 pictures"):
        model.generate_batch([[picture, Text("what?")], [picture, picture]], output="text", best_of=2)
    with pytest.raises(OmnitokError, match="cannot stream"):
        next(model.stream(requests[0], output="image", best_of=2))
    with pytest.raises(OmnitokError, match="has none"):
        model.generate([Image(pixels=np.zeros((64, 64, 3), np.uint8))], output="image", best_of=2)


def test_stream_yields_events(bundle_dir):
    model = omnitok.load(str(bundle_dir / "bundle"))
    events = list(model.stream([Text("draw a small star")], output="image", seed=0))
    assert any(isinstance(e, ImageOut) for e in events)
    assert all(isinstance(e, TextDelta | AudioChunk | ImageOut) for e in events)
    # streamed text adds up to the same reply, including bytes that never form a whole UTF-8 character
    request = [Text("what is this?")]
    whole = "".join(s.text for s in model.generate(request, output="text", max_new_tokens=12) if isinstance(s, Text))
    streamed = model.stream(request, output="text", max_new_tokens=12)
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == whole


def test_bad_requests_fail_clearly(bundle_dir):
    model = omnitok.load(str(bundle_dir / "bundle"))
    with pytest.raises(OmnitokError, match="empty prompt"):
        model.generate([Text("   ")])
    with pytest.raises(OmnitokError, match="empty prompt"):
        model.generate([])
    with pytest.raises(OmnitokError, match="output must be one of"):
        model.generate([Text("hi")], output="smell")
    with pytest.raises(OmnitokError, match="no speech tokenizer"):
        model.generate([Text("hi")], output="speech")
    with pytest.raises(OmnitokError, match="multiples of 8"):
        model.generate([Image(pixels=np.zeros((10, 10, 3), np.uint8))], output="text")
    with pytest.raises(OmnitokError, match="input image 32x32x3 gives 16 tokens"):
        model.generate([Image(pixels=np.zeros((32, 32, 3), np.uint8))], output="text")
    text_only = omnitok.load(str(bundle_dir / "textonly"))
    with pytest.raises(OmnitokError, match="cannot produce images"):
        text_only.generate([Text("draw")], output="image")
    with pytest.raises(OmnitokError, match="no image tokenizer"):
        text_only.generate([Image(pixels=np.zeros((64, 64, 3), np.uint8))], output="text")


def test_wrong_types_and_values_are_refused_by_name(bundle_dir):
    from omnitok.decoding import Sampling
    from omnitok.sequence import Audio

    model = omnitok.load(str(bundle_dir / "bundle"))
    picture = np.zeros((64, 64, 3), np.uint8)
    for call, message in [
        (lambda: model.generate("hello"), "a request is a list of segments"),
        (lambda: model.generate([{"type": "text"}]), "segment 0: expected Text, Image, Audio or Video, got dict"),
        (lambda: model.generate([Text(None)]), "Text.text must be a string"),
        (lambda: model.generate([Text("hi")], style="us_f1"), "style must be a mapping"),
        (lambda: model.generate([Text("hi")], max_new_tokens=2.5), "max_new_tokens must be an int"),
        (lambda: model.generate([Text("hi")], text=0.7), "text must be a Sampling"),
        (lambda: model.generate([Text("hi")], cfg_scale="2"), "cfg_scale must be a finite number"),
        (lambda: model.generate([Text("hi")], output="image", cfg_scale=float("nan")), "cfg_scale must be a finite"),
        (lambda: model.generate([Text("hi")], seed="x"), "seed must be an integer"),
        (lambda: model.generate([Text("hi")], seed=10**30), "seed must be an integer in"),
        (lambda: model.generate([Text("hi")], speech_chunk_frames=0), "speech_chunk_frames must be an int >= 1"),
        (lambda: Sampling(temperature=float("nan")), "bad sampling settings"),
        (lambda: Sampling(top_k=2.5), "bad sampling settings"),
        # two pictures of different sizes: the wrong one is named, not a numpy stacking error
        (
            lambda: model.generate([Image(pixels=picture), Image(pixels=picture[:32, :32])], output="text"),
            "input image 32x32x3 gives 16 tokens",
        ),
        (
            lambda: model.media([[Audio(samples=np.zeros(1600, np.float32), sample_rate=16000.5)]]),
            "sample_rate must be a whole number",
        ),
    ]:
        with pytest.raises(OmnitokError, match=message):
            call()


def test_requests_are_kept_inside_the_context(bundle_dir, monkeypatch):
    import omnitok.generate as gen_module

    model = omnitok.load(str(bundle_dir / "bundle"))  # max_position_embeddings 512; a picture is 64 codes + closer
    long_text, n = "", 0
    while n < 512 - 40:  # room for a short reply, not for a picture
        long_text += " a large red circle"
        n = len(model._prompt_ids([Text(long_text, role="user")], gen_module.GenerateOptions()))
    assert 512 - 65 < n < 512, n
    with pytest.raises(OmnitokError, match=r"context is 512 \(max_position_embeddings\): an image needs 65 more"):
        model.generate([Text(long_text)], output="image", cfg_scale=1.0)
    with pytest.raises(OmnitokError, match=r"request 1 is .* leaves no room for a reply"):
        model.generate_batch([[Text("hi")], [Text(long_text + " " + long_text)]], output="text")

    # A reply is cut where its own context ends; a short request in the same batch keeps its own limit.
    steps = []

    def endless(lm, prompts, constraint, cfg, uncond, gen):  # a model that never ends its reply
        steps.append(cfg.max_new_tokens)
        state = constraint.initial(len(prompts), "cpu")
        for _ in range(cfg.max_new_tokens):
            yield torch.full((len(prompts),), 7), state

    monkeypatch.setattr(gen_module, "iter_decode", endless)
    monkeypatch.setattr(model, "_render", lambda ids, opts, prefix, media=True: ids)
    long_ids, short_ids = model.generate_batch([[Text(long_text)], [Text("hi")]], output="text", max_new_tokens=600)
    short_n = len(model._prompt_ids([Text("hi", role="user")], gen_module.GenerateOptions()))
    assert steps == [512 - short_n] and len(short_ids) == 512 - short_n
    assert len(long_ids) == 512 - n


def test_broken_bundles_are_refused(bundle_dir, tmp_path):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(bundle_dir / "bundle", broken)
    manifest = json.loads((broken / "omnitok.json").read_text())
    manifest["vocab"]["codebooks"][0]["size"] += 1
    manifest["vocab"]["size"] += 1
    (broken / "omnitok.json").write_text(json.dumps(manifest))
    with pytest.raises(OmnitokError, match="image tokenizer has"):
        omnitok.load(str(broken))
    with pytest.raises(OmnitokError, match="not found"):
        omnitok.load(str(tmp_path / "nothing"))

    good = json.loads((bundle_dir / "bundle" / "omnitok.json").read_text())
    for edit, message in [
        (lambda m: [m], "field 'format' should be 'omnitok-bundle', got 'list'"),
        (lambda m: m | {"version": "one"}, "field 'version' should be an integer, got 'one'"),
        (lambda m: {k: v for k, v in m.items() if k != "vocab"}, "field 'vocab' should be the vocabulary's mapping"),
        (lambda m: m | {"vocab": m["vocab"] | {"size": "big"}}, "field 'size' should be an integer"),
        (lambda m: m | {"vocab": m["vocab"] | {"text_size": [1]}}, "a field has the wrong type"),
        (lambda m: m | {"tokenizers": {"text": 5}}, "field 'tokenizers' should map names to directories"),
        (lambda m: m | {"read_aloud_words": "two"}, "field 'read_aloud_words' should be an int >= 0, got 'two'"),
    ]:
        (broken / "omnitok.json").write_text(json.dumps(edit(json.loads(json.dumps(good)))))
        with pytest.raises(OmnitokError, match=message):
            omnitok.load(str(broken))
    (broken / "omnitok.json").write_text(json.dumps(good))
    weights = broken / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OmnitokError, match=r"the LM in .* cannot be loaded"):
        omnitok.load(str(broken))
    with pytest.raises(OmnitokError, match="a bundle is a directory"):
        omnitok.load(str(broken / "omnitok.json"))
    with pytest.raises(OmnitokError, match="'bogus' is not a torch device"):
        omnitok.load(str(bundle_dir / "bundle"), device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(OmnitokError, match="this torch has no CUDA device"):
            omnitok.load(str(bundle_dir / "bundle"), device="cuda")


def _cli(*args: str):
    import subprocess
    import sys

    code = "import sys; from omnitok.cli import main; sys.argv = ['omnitok', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_generate_cli_writes_reply_files(bundle_dir, tmp_path):
    from PIL import Image as PILImage

    from omnitok.generate_cli import generate_command, read_audio

    PILImage.fromarray(np.zeros((80, 80, 3), np.uint8)).save(tmp_path / "big.png")
    out = tmp_path / "reply"
    bundle = str(bundle_dir / "bundle")
    r = _cli("generate", bundle, "--text", "draw a small star", "--output", "image", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == [str(out / "image_0.png")]
    assert PILImage.open(out / "image_0.png").size == (64, 64)
    assert json.loads((out / "request.json").read_text())["output"] == "image"
    r = _cli("generate", bundle, "--text", "draw", "--output", "image", "--temperature", "image=0.9", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "request.json").read_text())["sampling"] == {
        "image": {"temperature": 0.9, "top_k": 64, "top_p": 1.0}
    }
    r = _cli("generate", bundle, "--text", "draw", "--temperature", "pixels=1", "--out", str(out))
    assert r.returncode == 2 and "MODALITY one of" in r.stderr
    r = _cli("generate", bundle, "--image", str(tmp_path / "big.png"), "--out", str(out))
    assert r.returncode == 2 and "80x80 pixels" in r.stderr and "--resize" in r.stderr

    def run(bundle_path, **kw):
        defaults = {"text": None, "image": None, "audio": None, "output": "text", "out": out, "voice": None,
                    "pitch": None, "rate": None, "reference": None, "max_new_tokens": 4, "cfg_scale": 3.0, "seed": 0,
                    "temperature": None, "top_k": None, "top_p": None, "resize": False, "device": "cpu"}  # fmt: skip
        generate_command(bundle_path, **{**defaults, **kw})

    (out / "mine.png").write_bytes(b"the user's own file")
    run(bundle_dir / "bundle", image=[tmp_path / "big.png"], resize=True, text="what is this?")
    assert (out / "reply.txt").is_file()
    # the earlier reply's picture is gone (a text reply does not leave it beside), the user's own file is not
    assert not (out / "image_0.png").exists() and (out / "mine.png").is_file()
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(OmnitokError, match="not a readable image"):
        run(bundle_dir / "bundle", image=[tmp_path / "notes.txt"])
    with pytest.raises(OmnitokError, match="empty prompt"):
        run(bundle_dir / "bundle")
    with pytest.raises(OmnitokError, match="cannot produce images"):
        run(bundle_dir / "textonly", text="hi", output="image")
    with pytest.raises(OmnitokError, match="no speech tokenizer"):
        run(bundle_dir / "bundle", audio=[tmp_path / "notes.txt"])
    with pytest.raises(OmnitokError, match="not a readable audio file"):
        read_audio(tmp_path / "notes.txt")
    import soundfile as sf

    sf.write(tmp_path / "stereo.wav", np.zeros((8000, 2), np.float32), 8000)
    assert read_audio(tmp_path / "stereo.wav").shape == (16000,)


def test_best_of_for_a_description_keeps_the_likeliest_as_read_and_as_drawn(bundle_dir):
    from omnitok.generate import DESCRIBE_SAMPLING

    model = omnitok.load(str(bundle_dir / "bundle"))
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    requests = [[Image(pixels=p), Text("Describe the picture.")] for p in pictures]
    opts = {"output": "text", "max_new_tokens": 8, "seed": 3}
    best = model.generate_batch(requests, best_of=3, **opts)
    plain = model.generate_batch(requests, **opts)
    twice = [r for r in requests for _ in (1, 2)]
    sampled = model.generate_batch(twice, **{**opts, "seed": 4, "text": DESCRIBE_SAMPLING})

    def text(reply):
        return " ".join(s.text for s in reply if isinstance(s, Text)).strip()

    for i, reply in enumerate(best):
        candidates = [text(r) for r in (plain[i], *sampled[2 * i : 2 * i + 2])]
        codes = model.bundle.image.encode(torch.as_tensor(pictures[i])[None])[0].numpy()
        # by hand: log p(text | the request) + log p(the picture | the text as a drawing request)
        reader = model.score([[*requests[i], Text(c, role="assistant")] for c in candidates])
        drawer = model.score([[Text(c, role="user"), Image(codes=codes, role="assistant")] for c in candidates])
        totals = [a + b for a, b in zip(reader, drawer, strict=True)]
        assert text(reply) == candidates[max(range(3), key=totals.__getitem__)]
    assert requests[0][0].codes is None  # the caller's segments are left as they were


def test_best_of_for_speech_keeps_the_clip_the_model_hears_the_text_in_likeliest(tmp_path):
    from omnitok.generate import HEAR_BACK_ASK, READ_ALOUD_SAMPLING
    from omnitok.sequence import Audio
    from serve_helpers import build_tiny_bundle

    model = omnitok.load(str(build_tiny_bundle(tmp_path)))
    requests = [[Text("Say this: hello there")], [Text("read aloud:   a small star ")]]
    opts = {"output": "speech", "max_new_tokens": 12, "seed": 3, "style": [{"voice": "us_f1"}, {"rate": "slow"}]}
    speech, decoded = model.bundle.speech, []
    decode = speech.decode
    speech.decode = lambda codes, **kw: decoded.append(len(codes)) or decode(codes, **kw)
    best = model.generate_batch(requests, best_of=3, **opts)
    assert len(decoded) == 2  # only the two kept clips become audio; the four dropped stay codes
    speech.decode = decode
    # the candidates it chose among: the plain clip, then 2 samples a request, spoken together seeded after it
    plain = model.generate_batch(requests, **opts)
    sampled = model.generate_batch(
        [r for r in requests for _ in (1, 2)],
        **{
            **opts,
            "seed": 4,
            "speech": READ_ALOUD_SAMPLING,
            "style": [{"voice": "us_f1"}] * 2 + [{"rate": "slow"}] * 2,
        },
    )

    def clip(reply):
        return next(s for s in reply if isinstance(s, Audio))

    for i, (reply, said) in enumerate(zip(best, ["hello there", "a small star"], strict=True)):
        candidates = [clip(r) for r in (plain[i], *sampled[2 * i : 2 * i + 2])]
        # by hand: log p(the text | the clip's codes, the transcription ask), the clip given without style tokens
        heard = model.score(
            [[Audio(codes=c.codes, role="user"), Text(HEAR_BACK_ASK, role="user"), Text(said, role="assistant")]
             for c in candidates]
        )  # fmt: skip
        assert all(np.isfinite(x) and x < 0 for x in heard)
        kept = clip(reply)
        assert np.array_equal(kept.codes, candidates[max(range(3), key=heard.__getitem__)].codes)
        assert kept.samples is not None and kept.samples.ndim == 1 and kept.sample_rate == 16000
    assert requests[0][0].text == "Say this: hello there"  # the caller's segments are left as they were

    with pytest.raises(OmnitokError, match=r"request 1 asks 'What is red\?', which does not start with one of"):
        model.generate_batch([requests[0], [Text("What is red?")]], output="speech", best_of=2)
    with pytest.raises(OmnitokError, match="does not start with one of"):  # the ask alone: no text to read
        model.generate([Text("Say this:  ")], output="speech", best_of=2)
    with pytest.raises(OmnitokError, match="cannot stream"):
        next(model.stream(requests[0], output="speech", best_of=2))


def _answer_then_speak(model):
    """Steer a random LM to open speech after each word it writes, as a trained one answers a spoken question."""
    from omnitok.vocab import SPAN_TOKENS

    opener, text_size = model.vocab.special(SPAN_TOKENS["speech"][0]), model.vocab.text_size
    forward = model.lm.forward

    @functools.wraps(forward)  # decoding reads the forward's signature (its cache argument's name)
    def steered(*args, **kw):
        out = forward(*args, **kw)
        out.logits[kw["input_ids"][:, -1] < text_size, -1, opener] += 100.0
        return out

    model.lm.forward = steered


def test_a_spoken_answer_speaks_in_the_requested_style_streamed_or_not(tmp_path):
    from omnitok.sequence import Audio
    from omnitok.vocab import SPAN_TOKENS, style_token
    from serve_helpers import build_tiny_bundle

    model = omnitok.load(str(build_tiny_bundle(tmp_path)))
    _answer_then_speak(model)
    style = {"voice": "us_f1", "rate": "slow"}
    opener = model.vocab.special(SPAN_TOKENS["speech"][0])
    forced = [model.vocab.special(style_token(k, v)) for k, v in style.items()]
    prompts = []
    module = importlib.import_module("omnitok.generate")
    iter_decode = module.iter_decode

    def spy(lm, rows, *a, **kw):
        prompts.extend(r.tolist() for r in rows)
        return iter_decode(lm, rows, *a, **kw)

    module.iter_decode = spy
    try:
        ask = {"output": "text+speech", "style": style, "seed": 1, "max_new_tokens": 40}
        [reply] = model.generate_batch([[Text("What is red?")]], **ask)
        streamed = list(model.stream([Text("What is red?")], **ask))
    finally:
        module.iter_decode = iter_decode
    # two passes: the words up to <speech>, then the clip from the words, <speech> and the requested style tokens
    assert len(prompts) == 4 and prompts[2:] == prompts[:2]  # streamed alike
    head = prompts[1][len(prompts[0]) :]
    assert head[-1 - len(forced)] == opener and head[-len(forced) :] == forced
    clip = next(s for s in reply if isinstance(s, Audio))
    assert clip.style is not None and all(clip.style[k] == v for k, v in style.items())
    assert clip.samples is not None and len(clip.samples) > 0
    words = "".join(s.text for s in reply if isinstance(s, Text))
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == words
    assert any(isinstance(e, AudioChunk) for e in streamed)
    with pytest.raises(OmnitokError, match=r"style voice='nobody' is not in this bundle; its voice values: \['") as err:
        model.generate([Text("What is red?")], output="text+speech", style={"voice": "nobody"})
    assert "<|" not in str(err.value)  # names a user can pass back, not vocabulary tokens
    with pytest.raises(OmnitokError, match=r"style field 'accent' is not in this bundle; its style fields: .*'voice'"):
        model.generate([Text("What is red?")], output="text+speech", style={"accent": "scottish"})


def test_a_spoken_answer_cut_at_max_text_tokens_is_spoken_as_cut(tmp_path):
    from omnitok.sequence import Audio
    from omnitok.vocab import SPAN_TOKENS
    from serve_helpers import build_tiny_bundle

    model = omnitok.load(str(build_tiny_bundle(tmp_path)))  # unsteered, the random LM writes words and never speaks
    ask = {"output": "text+speech", "seed": 2, "max_new_tokens": 30}
    [free] = model.generate_batch([[Text("What is red?")]], **ask)
    assert not any(isinstance(s, Audio) for s in free)
    module, prompts = importlib.import_module("omnitok.generate"), []
    iter_decode = module.iter_decode
    module.iter_decode = lambda lm, rows, *a, **kw: (
        prompts.extend(r.tolist() for r in rows) or iter_decode(lm, rows, *a, **kw)
    )
    try:
        [cut] = model.generate_batch([[Text("What is red?")]], **ask, max_text_tokens=3)
        streamed = list(model.stream([Text("What is red?")], **ask, max_text_tokens=3))
    finally:
        module.iter_decode = iter_decode
    head = prompts[1][len(prompts[0]) :]  # the clip's pass starts from three words and <speech>
    assert len(prompts) == 4 and prompts[2:] == prompts[:2] and len(head) == 4
    assert head[-1] == model.vocab.special(SPAN_TOKENS["speech"][0])
    words = "".join(s.text for s in cut if isinstance(s, Text))
    assert words == model.bundle.text.decode(head[:3]) and isinstance(cut[-1], Audio) and len(cut[-1].samples)
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == words
    assert any(isinstance(e, AudioChunk) for e in streamed)
    with pytest.raises(OmnitokError, match="max_text_tokens must be an int >= 1 or None, got 0"):
        model.generate([Text("What is red?")], **ask, max_text_tokens=0)


def test_words_that_end_without_speaking_are_spoken_all_the_same(tmp_path):
    """output="text+speech" asks for a clip: words the model ends without one (a typed question; the trained form is
    a spoken one) are followed by <speech> and the requested style, as words then clip were trained."""
    from omnitok.sequence import Audio
    from omnitok.vocab import END, SPAN_TOKENS, style_token
    from serve_helpers import build_tiny_bundle, steer_to_end

    model = omnitok.load(str(build_tiny_bundle(tmp_path)))
    forward = model.lm.forward
    steer_to_end(model, after_words=True)
    style = {"voice": "us_f1"}
    ask = {"output": "text+speech", "style": style, "seed": 1, "max_new_tokens": 40}
    module, prompts = importlib.import_module("omnitok.generate"), []
    iter_decode = module.iter_decode
    module.iter_decode = lambda lm, rows, *a, **kw: (
        prompts.extend(r.tolist() for r in rows) or iter_decode(lm, rows, *a, **kw)
    )
    try:
        [reply] = model.generate_batch([[Text("What is red?")]], **ask)
        streamed = list(model.stream([Text("What is red?")], **ask))
    finally:
        module.iter_decode = iter_decode
    head = prompts[1][len(prompts[0]) :]  # the clip's pass: the words, <speech> and the style, not <|end|>
    opener, voice = model.vocab.special(SPAN_TOKENS["speech"][0]), model.vocab.special(style_token("voice", "us_f1"))
    assert head[-2:] == [opener, voice] and model.vocab.special(END) not in head
    words = "".join(s.text for s in reply if isinstance(s, Text))
    assert words and words == model.bundle.text.decode(head[:-2])
    clip = next(s for s in reply if isinstance(s, Audio))
    assert clip.style["voice"] == "us_f1" and clip.samples is not None and len(clip.samples) > 0
    assert len(prompts) == 4 and prompts[2:] == prompts[:2]  # streamed alike
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == words
    assert any(isinstance(e, AudioChunk) for e in streamed)

    model.lm.forward = forward  # a reply that ends before any word has nothing to speak: it comes back empty
    steer_to_end(model, after_words=False)
    [empty] = model.generate_batch([[Text("What is red?")]], **ask)
    assert not any(isinstance(s, Audio) for s in empty) and not "".join(s.text for s in empty if isinstance(s, Text))
    assert not [e for e in model.stream([Text("What is red?")], **ask) if isinstance(e, AudioChunk | TextDelta)]


def test_best_of_for_a_spoken_answer_writes_it_once_and_keeps_the_clip_heard_likeliest(tmp_path):
    from omnitok.generate import HEAR_BACK_ASK
    from omnitok.sequence import Audio
    from serve_helpers import build_tiny_bundle

    model = omnitok.load(str(build_tiny_bundle(tmp_path)))
    forward = model.lm.forward
    _answer_then_speak(model)
    scored = []
    hear_back = model._hear_back
    model._hear_back = lambda replies, texts: scored.append((replies, texts)) or hear_back(replies, texts)
    speech, decoded = model.bundle.speech, []
    decode = speech.decode
    speech.decode = lambda codes, **kw: decoded.append(len(codes)) or decode(codes, **kw)
    requests = [[Text("What is red?")], [Text("Which shape is on the left?")]]
    opts = {"output": "text+speech", "max_new_tokens": 16, "seed": 3}
    best = model.generate_batch(requests, best_of=3, **opts)
    assert len(decoded) == 2  # only the kept clips become audio
    speech.decode = decode
    plain = model.generate_batch(requests, **opts)
    assert len(scored) == 2 and all(len(replies) == 3 for replies, _ in scored)  # one scoring per request
    for reply, first, (candidates, texts) in zip(best, plain, scored, strict=True):
        words = "".join(s.text for s in first if isinstance(s, Text)).strip()
        assert words and texts == [words] * 3  # every clip is heard against the plain reply's written words
        clips = [next(s for s in c if isinstance(s, Audio)) for c in candidates]
        assert np.array_equal(clips[0].codes, next(s for s in first if isinstance(s, Audio)).codes)
        for c in candidates:  # the words are written once: every candidate holds the plain reply's text
            assert "".join(s.text for s in c if isinstance(s, Text)).strip() == words
        heard = model.score(
            [[Audio(codes=c.codes, role="user"), Text(HEAR_BACK_ASK, role="user"), Text(words, role="assistant")]
             for c in clips]
        )  # fmt: skip
        kept = next(s for s in reply if isinstance(s, Audio))
        assert np.array_equal(kept.codes, clips[max(range(3), key=heard.__getitem__)].codes)
        assert kept.samples is not None and kept.samples.ndim == 1 and kept.sample_rate == 16000
    first_clips = {next(s for s in r if isinstance(s, Audio)).codes.tobytes() for r in scored[0][0]}
    assert len(first_clips) > 1  # the extra clips are samples, not copies of the plain one

    model.lm.forward = forward  # unsteered, the random LM writes words and never speaks: the reply comes as it was
    scored.clear()
    quiet = {**opts, "max_new_tokens": 3}
    plain = model.generate_batch(requests, **quiet)
    assert not any(isinstance(s, Audio) for r in plain for s in r)
    best = model.generate_batch(requests, best_of=3, **quiet)
    assert not scored and [[s.text for s in r] for r in best] == [[s.text for s in r] for r in plain]


def test_a_text_read_aloud_is_spoken_in_the_layout_the_bundle_was_trained_on(tmp_path):
    """A bundle trained in the read-aloud layout gets the request's words placed a chunk ahead of their speech, the
    LM speaking each chunk until it closes the span; the caller gets one clip, streamed or not, kept by best_of."""
    from omnitok.sequence import Audio, read_aloud_chunks
    from omnitok.vocab import SPAN_TOKENS, style_token
    from serve_helpers import build_tiny_bundle

    model = omnitok.load(str(build_tiny_bundle(tmp_path, read_aloud_words=2)))
    assert model.bundle.read_aloud_words == 2
    vocab, text = model.vocab, model.bundle.text
    opener, closer = (vocab.special(t) for t in SPAN_TOKENS["speech"])
    fed: list[list[int]] = []  # every row the LM was given: the prompt, then one id a step
    forward = model.lm.forward

    @functools.wraps(forward)  # decoding reads the forward's signature (its cache argument's name)
    def closing(*args, **kw):
        ids = kw["input_ids"]
        if ids.shape[1] > 1:
            fed.append(ids[0].tolist())
        else:
            fed[-1].append(int(ids[0, 0]))
        out = forward(*args, **kw)
        out.logits[:, -1, closer] += 3.0  # a random LM closes its spans within a few frames, as a trained one does
        return out

    model.lm.forward = closing
    said = "a large red circle in the top left"
    ask = {"output": "speech", "style": {"voice": "us_f1"}, "seed": 2}
    [clip] = model.generate([Text("Say this: " + said)], **ask)
    assert isinstance(clip, Audio) and clip.style == {"voice": "us_f1"}
    assert clip.samples is not None and len(clip.samples) > 0 and len(clip.codes) > 0
    # what the LM read: the words two by two, each chunk one ahead of the span that speaks it, then the end of turn
    seq = fed[0]
    reply = seq[seq.index(vocab.special("<|assistant|>")) + 1 :]
    words = [text.encode(c) for c in read_aloud_chunks(said, 2)]
    head = [*words[0], *words[1], opener, vocab.special(style_token("voice", "us_f1"))]
    assert reply[: len(head)] == head
    assert reply.count(opener) == 4 and reply.count(closer) == 4 and reply[-1] == vocab.special("<|end|>")
    k = [i for i, t in enumerate(reply) if t == closer]
    assert reply[k[0] + 1 : k[0] + 1 + len(words[2]) + 1] == [*words[2], opener]
    assert reply[k[1] + 1 : k[1] + 1 + len(words[3]) + 1] == [*words[3], opener]
    assert reply[k[2] + 1] == opener
    spoken = [t for t in reply if vocab.kind(t) == "speech"]
    assert np.array_equal(vocab.codes_to_ids("speech", clip.codes), spoken)  # the spans' codes, one clip

    # streamed: audio only (the placed words are the request's, not the reply), the same clip as one decoding
    events = list(model.stream([Text("Say this: " + said)], **ask))
    assert events and all(isinstance(e, AudioChunk) for e in events)
    assert sum(len(e.samples) for e in events) == len(clip.samples)
    # best_of keeps one of its clips, joined the same way; a request that reads nothing aloud is one span
    [best] = model.generate([Text("Say this: " + said)], best_of=2, **ask)
    assert isinstance(best, Audio) and best.samples is not None
    fed.clear()
    [other] = model.generate([Text("What is red?")], **ask)
    assert isinstance(other, Audio) and fed[0].count(opener) == 1 and fed[0][-1] == vocab.special("<|end|>")

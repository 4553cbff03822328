"""`medsight.Engine` on the tiny model: batching, feature cache, streaming, cancellation, threads, bad input."""

import threading

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

import medsight
from medsight.config import get_preset
from medsight.engine import Engine, VolumeSlices
from medsight.feature_cache import encoding_bytes
from medsight.imaging import Volume, read_volume
from medsight.model.generation import GenerationOptions
from medsight.model.loading import build_model
from medsight.prompt import Message

SLICES = [70, 95, 120]


class ForceRows(LogitsProcessor):
    """Row i of the batch writes scripts[i] (token ids, end-of-turn included), whatever the weights say."""

    def __init__(self, scripts):
        self.scripts = scripts

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        step = input_ids.shape[1]
        for row, ids in enumerate(self.scripts):
            out[row, ids[min(step, len(ids) - 1)]] = 0
        return out


@pytest.fixture(scope="module")
def model():
    # float64 so that batched and single runs agree to far below the 1e-5 mask tolerance.
    return medsight.load_model("tiny", device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    nib = pytest.importorskip("nibabel")
    datasets = pytest.importorskip("nilearn.datasets")
    path = tmp_path_factory.mktemp("mni") / "mni152.nii.gz"
    nib.save(datasets.load_mni152_template(), path)
    return read_volume(path)


def script(model, text):
    return [257, *model.tokenizer(text, add_special_tokens=False)["input_ids"], 258]


def images(n, seed=0, shape=(48, 40, 3)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def assert_same(a, b, tol=1e-5):
    """Two SliceAnswers agree: identical tokens and text, masks within tol."""
    assert a.token_ids == b.token_ids and a.text == b.text
    assert [(r.code, r.label) for r in a.regions] == [(r.code, r.label) for r in b.regions]
    for ra, rb in zip(a.regions, b.regions, strict=True):
        assert float((ra.mask_logits - rb.mask_logits).abs().max()) <= tol
        assert np.array_equal(ra.mask, rb.mask) and ra.bbox == rb.bbox
        assert abs(ra.probability - rb.probability) <= tol


def test_volume_slices_batched_equal_one_by_one(model, volume):
    texts = ["assistant\nLiver [M0_16], spleen [M0_7].", "assistant\nNothing.", "assistant\nA [M1_3] B [M0_2] C [M0_9]"]
    scripts = [script(model, t) for t in texts]
    question = "Segment the organs."
    batched = Engine(model, cache_bytes=0).ask(
        VolumeSlices(volume, "axial", SLICES), question, GenerationOptions(logits_processors=[ForceRows(scripts)])
    )
    assert [a.slice_index for a in batched] == SLICES and not batched.cancelled
    assert [len(a.regions) for a in batched] == [2, 0, 3]
    assert [[r.index for r in a.regions] for a in batched] == [[0, 1], [], [0, 1, 2]]  # per slice, not per volume
    single_engine = Engine(model, cache_bytes=0)
    for i, index in enumerate(SLICES):
        options = GenerationOptions(logits_processors=[ForceRows([scripts[i]])])
        single = single_engine.ask(VolumeSlices(volume, "axial", [index]), question, options)[0]
        assert_same(batched[i], single)
        reference = model.ask(_rgb(volume, index), question, options)
        assert reference.token_ids == single.token_ids
        for region, ref in zip(single.regions, reference.regions, strict=True):
            assert float((region.mask_logits - ref.mask_logits).abs().max()) <= 1e-5
    first = batched[0]
    assert first.text == "Liver [M0_16], spleen [M0_7]."
    described = [(r.code, r.label, r.slice_index) for r in first.regions]
    assert described == [("[M0_16]", "Liver", 70), ("[M0_7]", "spleen", 70)]
    for region in first.regions:
        assert region.mask.shape == first.slice.shape and region.mask.dtype == bool
        if region.mask.any():
            r0, c0, r1, c1 = region.bbox
            assert region.mask[r0 : r1 + 1, c0 : c1 + 1].sum() == region.mask.sum()


def _rgb(volume, index):
    """The engine's pixels for an MR slice: one robust window for the whole volume."""
    from medsight.imaging import choose_window, extract_slice, to_rgb

    window = choose_window(volume.array, volume.modality)
    return to_rgb(extract_slice(volume, "axial", index).pixels, volume.modality, center=window.center,
                  width=window.width)


def test_greedy_batch_tokens_equal_one_by_one_without_forcing(model):
    engine = Engine(model, cache_bytes=0)
    pictures = images(3, seed=1)
    options = GenerationOptions(max_new_tokens=6)
    batched = engine.ask(pictures, "What is shown?", options)
    for i, picture in enumerate(pictures):
        assert_same(batched[i], engine.ask([picture], "What is shown?", options)[0])


def test_cache_skips_encode_and_gives_identical_answers(model):
    engine = Engine(model)
    image = images(1, seed=2)
    options = GenerationOptions(logits_processors=[ForceRows([script(model, "assistant\nKidney [M0_4].")])])
    first = engine.ask(image, "Segment the kidney.", options)[0]
    assert engine.encode_calls == 1 and not first.cached and first.timings.encode > 0
    second = engine.ask(image, "Segment the kidney.", options)[0]
    assert engine.encode_calls == 1 and second.cached and second.timings.encode == 0
    assert_same(first, second, tol=0.0)
    stats = engine.cache_stats
    assert (stats.hits, stats.entries) == (1, 1)


def test_cache_evicts_least_recently_used_beyond_its_bound(model):
    one = encoding_bytes(model.encode(model.prepare(images(1)[0])[0]))
    engine = Engine(model, cache_bytes=int(one * 1.5))
    a, b = images(2, seed=3)
    options = GenerationOptions(max_new_tokens=2)
    engine.ask([a], "Q?", options)
    engine.ask([b], "Q?", options)
    assert len(engine.cache) == 1 and engine.cache_stats.evictions == 1
    assert engine.ask([b], "Q?", options)[0].cached
    assert not engine.ask([a], "Q?", options)[0].cached
    assert engine.encode_calls == 3


def test_streaming_deltas_add_up_to_the_text_and_regions_are_reported(model):
    engine = Engine(model)
    scripts = [script(model, "assistant\nLiver [M0_16] here."), script(model, "assistant\nNo finding.")]
    tokens, regions = {0: [], 1: []}, []
    answer = engine.ask(
        images(2, seed=4), "Describe.", GenerationOptions(logits_processors=[ForceRows(scripts)]),
        on_token=lambda i, delta: tokens[i].append(delta), on_region=lambda i, r: regions.append((i, r.code)),
    )
    assert "".join(tokens[0]) == answer[0].text == "Liver [M0_16] here."
    assert "".join(tokens[1]) == answer[1].text == "No finding."
    assert not any("assistant" in d for d in tokens[0] + tokens[1])
    assert regions == [(0, "[M0_16]")]


def test_cancel_from_on_token_returns_partial_answer(model):
    engine = Engine(model)
    cancel = threading.Event()
    calls = []

    def on_token(index, delta):
        calls.append(delta)
        if len(calls) == 3:
            cancel.set()

    long_text = script(model, "The liver is normal. " * 20)
    options = GenerationOptions(max_new_tokens=200, logits_processors=[ForceRows([long_text])])
    answer = engine.ask(images(1, seed=5), "Describe.", options, on_token=on_token, cancel=cancel)
    assert answer.cancelled and answer[0].cancelled
    assert len(answer[0].token_ids) <= 4 and answer[0].text == "".join(calls)
    # Already cancelled before starting: nothing runs, no error.
    early = engine.ask(images(1, seed=6), "Describe.", options, cancel=cancel)
    assert early.cancelled and early[0].text == "" and engine.cache_stats.entries == 1


def test_a_cancel_during_encoding_stops_before_the_next_encode_batch(model):
    """Before the fix a cancel (or the engine's stop) was first seen at the first generation step, after every slice
    was encoded: minutes for an ask of many slices with the full model on a CPU (1024 demo slices: 234 s), the
    engine's stop waiting on it. Now the ask ends before the next encode batch, with empty cancelled answers."""
    engine = Engine(model, encode_batch=1)
    pictures = images(6, seed=11)

    class SetOnceEncoding(threading.Event):
        """The client's cancel, arriving while the first batch is encoded."""

        def is_set(self) -> bool:
            return engine.encode_calls >= 1

    answer = engine.ask(pictures, "Describe.", GenerationOptions(max_new_tokens=4), cancel=SetOnceEncoding())
    assert engine.encode_calls == 1 and answer.cancelled
    assert [(a.text, a.cancelled, a.slice_index) for a in answer] == [("", True, i) for i in range(len(pictures))]


@pytest.mark.parametrize("signal", ["cancel", "abandon"])
def test_a_stop_while_the_slices_are_prepared_ends_the_ask_before_the_next_slice(model, volume, monkeypatch, signal):
    """Before the fix every slice was windowed, resized and hashed before a stop was first looked at: 1024 slices of
    a stored volume took 11.5 s under load, which a cancel, a client gone (abandon) or the engine's stop waited out.
    Now the ask ends before the next slice, with an empty cancelled answer (and its geometry) for every slice asked."""
    from medsight.imaging import extract_slice, slice_count

    indices = list(range(0, slice_count(volume, "axial"), 4))
    stop, prepare, prepared = threading.Event(), model.prepare, []

    def third_slice_stops(*args, **kwargs):
        prepared.append(1)
        if len(prepared) == 3:
            stop.set()  # the client's cancel (or hang-up), arriving while the slices are prepared
        return prepare(*args, **kwargs)

    monkeypatch.setattr(model, "prepare", third_slice_stops)
    engine = Engine(model)
    answer = engine.ask(VolumeSlices(volume, "axial", indices), "Describe.", GenerationOptions(max_new_tokens=4),
                        **{signal: stop})
    assert len(prepared) == 3, f"{len(prepared) - 3} of {len(indices)} slices were prepared after the cancel"
    assert answer.cancelled and engine.encode_calls == 0
    assert [(a.text, a.cancelled, a.slice_index) for a in answer] == [("", True, i) for i in indices]
    for a in answer:
        assert np.array_equal(a.slice.slice_to_ras, extract_slice(volume, "axial", a.slice_index).slice_to_ras)


def test_concurrent_asks_get_their_own_results(model):
    pictures = images(12, seed=7)
    options = GenerationOptions(logits_processors=[ForceRows([script(model, "assistant\nMass [M0_5].")])])
    reference = Engine(model, cache_bytes=0)
    expected = [reference.ask([p], "Segment.", options)[0] for p in pictures]
    shared = Engine(model)
    results, errors = {}, []

    def worker(t):
        try:
            for j in range(3):
                k = 3 * t + j
                results[k] = shared.ask([pictures[k]], "Segment.", options)[0]
        except Exception as exc:  # surfaced below; a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(results) == list(range(12))
    for k in range(12):
        assert_same(results[k], expected[k])
    assert shared.encode_calls == 12


def test_multi_turn_conversation_matches_the_model(model):
    image = images(1, seed=8)[0]
    history = [Message("user", "Is this CT?"), Message("assistant", "Yes."), Message("user", "Which organ?")]
    options = GenerationOptions(max_new_tokens=5)
    answer = Engine(model).ask([image], history, options)[0]
    assert answer.token_ids == model.ask(image, history, options).token_ids


def test_bad_input_is_refused_with_clear_messages(model, volume):
    engine = Engine(model)
    with pytest.raises(ValueError, match="no images given"):
        engine.ask([], "Q?")
    with pytest.raises(ValueError, match="expected uint8"):
        engine.ask([np.zeros((8, 8), dtype=np.float32)], "Q?")
    with pytest.raises(ValueError, match="wrap a single image"):
        engine.ask(np.zeros((8, 8), dtype=np.uint8), "Q?")
    with pytest.raises(ValueError, match="out of range"):
        engine.ask(VolumeSlices(volume, "axial", [10_000]), "Q?")
    with pytest.raises(ValueError, match="unique"):
        engine.ask(VolumeSlices(volume, "axial", [3, 3]), "Q?")
    with pytest.raises(ValueError, match="messages is empty"):
        engine.ask(images(1), [])
    for blank in ("", " \n\t"):
        with pytest.raises(ValueError, match="question is empty"):
            engine.ask(images(1), blank)
    with pytest.raises(ValueError, match="question is empty"):
        engine.ask(images(1), [Message("user", "Q?"), Message("assistant", "A."), Message("user", "  ")])
    # No user turn at all was called "the question is empty", as if one had been sent blank.
    with pytest.raises(ValueError, match=r"no user message \(only system, assistant\)"):
        engine.ask(images(1), [Message("system", "Be brief."), Message("assistant", "A.")])
    # A conversation ending with the model's own turn has no question to answer: the demo model answered
    # [segment the white matter, "Sure."] with "The pancreas is not visible in this image."
    for last in ("assistant", "system", "gpt"):
        with pytest.raises(ValueError, match=f"ends with a message of role '{last}'; end it with the user's question"):
            engine.ask(images(1), [Message("user", "Q?"), Message(last, "A.")])
    # An unknown last role was named as the role the conversation ends with, not as unknown.
    with pytest.raises(ValueError, match="unknown message role 'foo'; use user, assistant or system"):
        engine.ask(images(1), [Message("user", "Q?"), Message("foo", "A.")])
    # The official data's "human" turn is a user turn (as the prompt renders it): its blank question is named.
    with pytest.raises(ValueError, match="question is empty"):
        engine.ask(images(1), [Message("human", "  ")])
    with pytest.raises(ValueError, match="cache_bytes"):
        Engine(model, cache_bytes=-1)
    # A volume no percentile window can show: the message says the window came from its values (the caller gave
    # none) and what to do.
    huge = Volume(np.full((2, 8, 8), 1e31, np.float32), modality="MR")
    with pytest.raises(ValueError, match=r"values give the window .*rescale its values \(or, from Python"):
        engine.ask(VolumeSlices(huge, "axial", [0]), "Q?")


class NoEndOfTurn(LogitsProcessor):
    """The answer never ends by itself: it runs to max_new_tokens."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids, scores):
        scores[:, self.eos] = float("-inf")
        return scores


def test_an_ask_that_may_run_past_the_language_models_positions_is_refused_up_front():
    """Generation past `max_position_embeddings` raised nothing: the answer went on, on positions the model never saw.
    A language model with few positions shows it quickly."""
    config = get_preset("tiny")
    engine = Engine(build_model(config))
    prompt = engine.prompt_length(engine._prompt("Where?"))
    config.llm.max_position_embeddings = prompt + 40
    engine = Engine(build_model(config))
    options = GenerationOptions(max_new_tokens=41, repetition_penalty=1.0,
                                logits_processors=[NoEndOfTurn(config.llm.eos_token_id)])
    with pytest.raises(ValueError, match=rf"max_new_tokens 41 after a prompt of {prompt} embeddings .* at most 40 "):
        engine.ask(images(1), "Where?", options)
    options.max_new_tokens = 40
    assert len(engine.ask(images(1), "Where?", options)[0].token_ids) == 40


def test_load_builds_an_engine():
    engine = Engine.load("tiny", device="cpu", cache_bytes=0)
    assert isinstance(engine.model, medsight.MedSIGHTModel) and engine.cache.max_bytes == 0


def test_load_selects_the_perceiver_attention():
    """The default fused kernel ("sdpa") gives the official ("eager") answer; an unknown kernel is a clear error."""
    eager = Engine.load("tiny", device="cpu", dtype=torch.float64, cache_bytes=0, perceiver_attention="eager")
    sdpa = Engine.load("tiny", device="cpu", dtype=torch.float64, cache_bytes=0)
    assert eager.model.region_perceiver.attention_implementation == "eager"
    assert sdpa.model.region_perceiver.attention_implementation == "sdpa"
    options = GenerationOptions(logits_processors=[ForceRows([script(eager.model, "assistant\nKidney [M0_4].")])])
    a = eager.ask(images(1, seed=5), "Segment the kidney.", options)[0]
    b = sdpa.ask(images(1, seed=5), "Segment the kidney.", options)[0]
    assert len(a.regions) == 1
    assert_same(a, b, tol=1e-9)
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        Engine.load("tiny", device="cpu", perceiver_attention="flash")


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_prompt_length_counts_the_embeddings_the_language_model_gets(preset):
    """The engine checks a prompt's length before encoding any image, so it counts the image's embeddings from the
    config; that count must be what the model really inserts for one image."""
    engine = Engine.load(preset, device="cpu")
    size = engine.model.config.vision.image_size
    with torch.no_grad():
        inserted = engine.model.image_embeddings(engine.model.encode(torch.zeros(1, 3, size, size)))
    assert [e.shape[0] for e in inserted] == [engine.image_embeddings]
    prompt = engine._prompt([Message("user", "Where is the liver?")])
    assert engine.prompt_length(prompt) == len(prompt) - 1 + inserted[0].shape[0]


def test_abandon_stops_the_mask_decoding_before_the_next_perceiver_batch(model, monkeypatch):
    """An ask nobody will read (`abandon`, set when its client went away) decodes no more masks: before the fix
    the worker decoded every region of an ask whose text was complete."""
    texts = ["A [M0_1].", "A [M0_1] B [M0_2].", "A [M0_1] B [M0_2] C [M0_3]."]  # one perceiver batch per count
    options = GenerationOptions(logits_processors=[ForceRows([script(model, t) for t in texts])])
    pictures = images(len(texts), seed=11)
    plain = Engine(model, cache_bytes=0).ask(pictures, "Segment.", options)
    kept = Engine(model, cache_bytes=0).ask(pictures, "Segment.", options, abandon=threading.Event())
    assert [len(a.regions) for a in plain] == [1, 2, 3] and not kept.cancelled
    for a, b in zip(plain, kept, strict=True):
        assert_same(a, b, tol=0)  # an abandon flag never set changes nothing

    abandon, decode, calls = threading.Event(), model.region_perceiver.decode, []

    def first_batch_abandons(*args, **kwargs):
        calls.append(1)
        abandon.set()
        return decode(*args, **kwargs)

    monkeypatch.setattr(model.region_perceiver, "decode", first_batch_abandons)
    cut = Engine(model, cache_bytes=0).ask(pictures, "Segment.", options, abandon=abandon)
    assert len(calls) == 1, f"{len(calls) - 1} of {len(texts)} perceiver batches ran after the abandon"
    assert cut.cancelled and all(a.cancelled and a.regions == [] for a in cut)
    assert [a.text for a in cut] == [a.text for a in plain]


def test_seeded_sampling_gives_each_image_the_answer_it_gets_alone(model):
    """A seeded sampled answer depends on its image only, not on the batch it was asked in (one shared generator
    gave row i the draws left over by the rows before it)."""
    engine = Engine(model)
    pictures = images(3, seed=12)
    options = GenerationOptions(do_sample=True, temperature=3.0, seed=5, max_new_tokens=12, min_new_tokens=12)
    batched = engine.ask(pictures, "Describe.", options)
    for i, picture in enumerate(pictures):
        alone = engine.ask([picture], "Describe.", options)[0]
        assert batched[i].token_ids == alone.token_ids
    reversed_batch = engine.ask(pictures[::-1], "Describe.", options)
    assert [a.token_ids for a in reversed_batch] == [a.token_ids for a in batched][::-1]

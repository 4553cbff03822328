"""`Engine`: one loaded MedSIGHT model answering questions about images or volume slices.

One ask = prepare every slice (CPU) -> encode the slices not in the feature cache (one batch) -> generate all
answers as one left-padded batch -> decode every slice's region codes in one padded perceiver call -> map masks
back onto each slice's pixel grid. Batching never changes an answer: results equal one-by-one asks.

Streaming (`on_token`, `on_region`) and cancellation (`cancel`) are plain callables and a `threading.Event`, so
the HTTP server, the CLI and tests drive the same code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers.decoders import DecodeStream

from medsight.answer import Answer, Region, Timings, regions_from_logits
from medsight.feature_cache import CacheStats, FeatureCache, content_key
from medsight.imaging import ImagingError, Slice, Volume, Window, choose_window, iter_slices, slice_count, to_rgb
from medsight.imaging.window import explicit_window
from medsight.model.generation import GenerationOptions, GenerationOutput
from medsight.model.loading import load_model
from medsight.model.lvlm import IMAGE_TOKEN_INDEX
from medsight.model.medsight import ImageEncoding, ImageOptions, MedSIGHTModel
from medsight.model.perceiver import CastDecode, GridFeatures
from medsight.model.preprocess import InputTransform
from medsight.prompt import (
    ASSISTANT_PREFIX,
    Message,
    check_roles,
    questions_of,
    strip_assistant_prefix,
    tokenize_prompt,
)

#: Default feature-cache bound. Encodings live on the model's device; 1 GiB (~400 slices of the full model in
#: bf16) keeps the full model within its 18.5 GB GPU budget.
DEFAULT_CACHE_BYTES = 1 << 30
#: Slices encoded per ViT call: bounds activation memory when a whole volume is asked at once.
DEFAULT_ENCODE_BATCH = 32
#: The perceiver's query-independent start (`GridFeatures`, ~5x a grid) is kept from encode to decode within one ask
#: while the ask's fresh slices need at most this much (~40 full-size slices in bf16); larger asks recompute it.
KEPT_GRID_FEATURES_BYTES = 256 << 20

TokenCallback = Callable[[int, str], None]
RegionCallback = Callable[[int, Region], None]


@dataclass
class VolumeSlices:
    """Slices of a volume to ask about.

    Attributes:
        volume: the volume (raw intensities, e.g. HU for CT).
        plane: "axial", "coronal" or "sagittal".
        indices: slice indices along the plane's axis (unique).
        window: a CT preset name ("abdomen", "lung", ..., or "auto"), an explicit `Window`, or None for the
            modality default. The window is computed once for the whole volume, so a slice's pixels (and so its
            answer and cache entry) never depend on which other slices are asked with it.
    """

    volume: Volume
    plane: str
    indices: Sequence[int]
    window: str | Window | None = None


# The engine's answers are `medsight.answer.Answer`/`Region` (one type for every caller); these names remain for
# the callers written against them.
SliceAnswer = Answer
SliceRegion = Region


@dataclass
class EngineAnswer:
    """All slices' answers to one question, in request order, and the whole ask's timings."""

    answers: list[Answer]
    timings: Timings
    cancelled: bool = False

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> Answer:
        return self.answers[i]

    def __iter__(self):
        return iter(self.answers)


@dataclass
class _Input:
    """One prepared slice of a request."""

    slice_index: int
    pixels: torch.Tensor
    transform: InputTransform
    key: str
    slice: Slice | None = None


class _TextStream:
    """Incremental text of one generated row, for `on_token`.

    The row's text grows through the tokenizer library's streaming decoder (`tokenizers.decoders.DecodeStream`),
    which decodes only the tokens since the last complete character: re-decoding the whole row at every token made
    a stream's cost grow with the square of its length. Holds back text that may still become the `assistant\\n`
    header or an incomplete UTF-8 character, and emits only what is new.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the row decoded up to its last complete character
        self.emitted = ""
        # Slow (pure Python) tokenizers have no backend; a clean-up pass rewrites text across token boundaries.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = self._backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._stream = DecodeStream(skip_special_tokens=True) if plain else None

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._row_text(token_id)
        if text is None or text.endswith("\ufffd") or ASSISTANT_PREFIX.startswith(text.lstrip()):
            return ""
        return self._advance(strip_assistant_prefix(text))

    def _row_text(self, token_id: int) -> str | None:
        """The row's whole text after ``token_id``, or None while it has not changed or ends mid-character."""
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:  # the decoder refuses text that rewrites its past: re-decode this row from now on
                self._stream = None
            else:
                if not piece:
                    return None
                self.text += piece
                return self.text
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.text

    def flush(self, final_text: str) -> str:
        """Whatever the final answer has beyond what was streamed (held-back tail)."""
        return self._advance(final_text)

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.emitted):
            return ""  # cannot happen for prefix-stable tokenizers; never emit text that contradicts the past
        delta = visible[len(self.emitted) :]
        self.emitted = visible
        return delta


class Engine:
    """Holds one MedSIGHTModel and answers questions about 8-bit images or volume slices.

    Thread-safe: concurrent `ask` calls are serialised around the model by one lock, because one device runs one
    batch at a time and interleaving two generations would only add memory, not speed; batching many slices into
    one ask is the way to throughput. Preparing images and hashing them runs outside the lock. Callbacks run on
    the asking thread while the lock is held, so they must be quick and must not call `ask` on this engine.
    """

    def __init__(
        self,
        model: MedSIGHTModel,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        encode_batch: int = DEFAULT_ENCODE_BATCH,
        vision_backend=None,
        mask_decode_dtype: torch.dtype | None = None,
    ) -> None:
        """Args:
        vision_backend: optional `medsight.onnx_backend.OnnxVisionBackend` that runs the ViT and the perceiver
            (encode and decode) in ONNX Runtime, in float32 whatever the model's dtype (held to the PyTorch results in
            float32 only); the language model stays in PyTorch.
        mask_decode_dtype: decode masks with a copy of the perceiver in this dtype (e.g. torch.bfloat16):
            approximate, off by default; text and region tokens stay exact (`perceiver.CastDecode`). Not with a
            `vision_backend`, whose perceiver graph decodes in float32.
        """
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer; load one with the model (load_model) to ask questions")
        if encode_batch < 1:
            raise ValueError("encode_batch must be >= 1")
        self.model = model.eval()
        self.vision_backend = vision_backend
        self.encode_batch = encode_batch
        self.cache = FeatureCache(cache_bytes)
        self._model_lock = threading.Lock()
        self.encode_calls = 0  # number of model.encode batches run (observability and tests)
        # The perceiver decode that `model.decode_regions` runs: None = the model's own (which may reuse the encode
        # pass's grid features), the ONNX graph, or a copy in another dtype. One mask path for every backend.
        self.mask_decode = None
        if vision_backend is not None:
            if mask_decode_dtype is not None:
                raise ValueError("mask_decode_dtype applies to the PyTorch perceiver; the ONNX backend decodes in "
                                 "float32: choose one")
            vision_backend.check_model(model)
            self.mask_decode = vision_backend.region_decode
        elif mask_decode_dtype is not None and mask_decode_dtype != model.dtype:
            self.mask_decode = CastDecode(model.region_perceiver, mask_decode_dtype)

    @classmethod
    def load(
        cls,
        source: str = "demo",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        onnx_dir: str | None = None,
        perceiver_attention: str = "sdpa",
        mask_decode_dtype: torch.dtype | None = None,
        **load_kwargs,
    ) -> Engine:
        """Load a model (see `medsight.load_model`) and wrap it; `onnx_dir` (from `medsight export-onnx`) runs
        the vision side in ONNX Runtime.

        `perceiver_attention`: "sdpa" (default: PyTorch's fused attention kernel, the same function as the official
        arithmetic within float rounding, and faster: measure with `benchmarks/official_style.py`) or
        "eager" (the official fill-and-softmax arithmetic, what the golden parity tests run).
        `mask_decode_dtype`: see `Engine.__init__` (approximate, off by default).
        """
        backend = None
        if onnx_dir is not None:
            from medsight.onnx_backend import OnnxVisionBackend

            backend = OnnxVisionBackend(onnx_dir)
        model = load_model(source, device=device, dtype=dtype, **load_kwargs)
        model.region_perceiver.attention_implementation = perceiver_attention
        return cls(model, cache_bytes=cache_bytes, vision_backend=backend, mask_decode_dtype=mask_decode_dtype)

    @property
    def cache_stats(self) -> CacheStats:
        return self.cache.stats

    # -- public --------------------------------------------------------------------------------------------------
    def ask(
        self,
        images: Sequence[np.ndarray] | VolumeSlices,
        messages: str | Sequence[Message],
        options: GenerationOptions | None = None,
        image_options: ImageOptions | None = None,
        on_token: TokenCallback | None = None,
        on_region: RegionCallback | None = None,
        cancel: threading.Event | None = None,
        abandon: threading.Event | None = None,
    ) -> EngineAnswer:
        """Ask the same question about every image (or volume slice); one answer per slice, in order.

        Args:
            images: 8-bit (H, W) or (H, W, 3) arrays, or `VolumeSlices`.
            messages: a question, or a conversation (the image goes in the first user turn).
            on_token: called with (slice_index, text delta) as text is generated.
            on_region: called with (slice_index, region) once that slice's masks are decoded.
            cancel: when set, generation stops after the current step; the partial answers come back with
                `cancelled=True`, with the masks of the text generated so far.
            abandon: when set, nobody will read the answer (the client went away): like `cancel`, and the mask
                decoding stops too, before its next perceiver batch; the answers come back with their text, no
                masks and `cancelled=True`.
        Raises:
            ValueError: empty input, a non-8-bit image, a slice index out of range, a bad conversation.
        """
        options = options or GenerationOptions()
        image_options = image_options or ImageOptions()
        prompt = self._prompt(messages)
        self.check_generation_length(self.prompt_length(prompt), options.max_new_tokens)
        stop = _StopFlags(cancel, abandon)
        inputs = self._prepare(images, image_options, stop.cancelled)
        if inputs is None or stop.cancelled():
            return _stopped(_places(images) if inputs is None else inputs)
        with self._model_lock:
            return self._run(inputs, prompt, options, image_options, on_token, on_region, stop)

    def clear_cache(self) -> None:
        """Forget all cached features (needed only if the model's weights were changed in place)."""
        self.cache.clear()

    # -- request preparation -------------------------------------------------------------------------------------
    def _prompt(self, messages: str | Sequence[Message]) -> list[int]:
        if isinstance(messages, str):
            turns = [Message("user", messages)]
        else:
            turns = list(messages)
            if not turns:
                raise ValueError("messages is empty; give a question or a conversation")
            bad = [m for m in turns if not isinstance(m, Message)]
            if bad:
                raise ValueError(f"messages must be medsight.prompt.Message objects, got {type(bad[0]).__name__}")
        check_roles(turns)  # first: an unknown last role is named as unknown, not as "ends with a message of role"
        questions = questions_of(turns)
        if questions:  # none: render_messages refuses the conversation, naming the roles it has
            if not questions_of(turns[-1:]):
                # The prompt has no generation header: after a closed assistant (or system) turn the model writes
                # another assistant turn, to no question (the demo model answered "Sure." with a pancreas finding).
                raise ValueError(f"the conversation ends with a message of role {turns[-1].role!r}; end it with "
                                 "the user's question")
            check_question(questions[-1])
        prompt = tokenize_prompt(self.model.tokenizer, turns, num_images=1)
        # Checked here, before any image is encoded (the language model would refuse it only after).
        length, limit = self.prompt_length(prompt), self.model.config.llm.max_sequence_length
        if length > limit:
            raise ValueError(f"the prompt is {length} embeddings long ({self.image_embeddings} of them the image's), "
                             f"more than the model's {limit}; shorten the question or the conversation")
        return prompt

    @property
    def image_embeddings(self) -> int:
        """Embeddings one image adds to a prompt: its patch tokens and the perceiver's region tokens."""
        return self.model.config.image_embeddings

    def check_generation_length(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse an ask whose prompt and new tokens may run past the positions the language model knows
        (`max_position_embeddings`). Past them generation goes on without any error, on positions the model never
        saw: its text turns to noise. The official code goes on too (transformers warns only once the new tokens
        alone pass them); here it is refused before any image is encoded."""
        limit = self.model.config.llm.max_position_embeddings
        if prompt_length + max_new_tokens > limit:
            raise ValueError(f"max_new_tokens {max_new_tokens} after a prompt of {prompt_length} embeddings may run "
                             f"past the language model's {limit} positions; ask for at most "
                             f"{max(limit - prompt_length, 0)} new tokens")

    def prompt_length(self, prompt: Sequence[int]) -> int:
        """Embeddings the language model sees for a tokenized prompt (each image placeholder becomes the image's)."""
        images = sum(1 for token in prompt if token == IMAGE_TOKEN_INDEX)
        return len(prompt) + images * (self.image_embeddings - 1)

    def _prepare(self, images: Sequence[np.ndarray] | VolumeSlices, image_options: ImageOptions,
                 should_stop: Callable[[], bool] = lambda: False) -> list[_Input] | None:
        """8-bit pixels of every requested slice -> model input, inverse transform and cache key. None when
        `should_stop` says so before a slice: a cancel, a client gone or the engine's stop waited out the windowing,
        resizing and hashing of every slice (1024 slices of 512 x 512: 7.7 s). A slice takes milliseconds, the check
        a quarter of a microsecond."""
        if isinstance(images, VolumeSlices):
            count, sources = self._volume_images(images)
        else:
            if isinstance(images, np.ndarray):
                raise ValueError("images must be a list of arrays; wrap a single image as [image]")
            sources = [(i, np.asarray(image), None) for i, image in enumerate(images)]
            count = len(sources)
        if not count:
            raise ValueError("no images given; pass at least one image or slice index")
        identity = self._model_identity()
        prepared = []
        transforms: dict = {}  # equal transforms (same image shape) share one object and so its sampling grid
        for index, image, geometry in sources:
            if should_stop():
                return None
            if image.dtype != np.uint8:
                raise ValueError(
                    f"image {index} has dtype {image.dtype}; expected uint8 (window it with medsight.imaging.to_rgb)"
                )
            pixels, transform = self.model.prepare(image, image_options.resize_mode)
            transform = transforms.setdefault(transform, transform)
            key = content_key(pixels, image_options.resize_mode, image_options.round_pixels_to_bf16, identity)
            prepared.append(_Input(index, pixels, transform, key, geometry))
        return prepared

    def _volume_images(self, request: VolumeSlices) -> tuple[int, Iterator[tuple[int, np.ndarray, Slice]]]:
        """How many slices, and each one's 8-bit image made as it is prepared: a stopped ask makes no more, and the
        images of a whole volume are not all held at once. The request is checked first."""
        volume, plane = request.volume, request.plane
        indices = [int(i) for i in request.indices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"slice indices must be unique, got {indices}")
        count = slice_count(volume, plane)
        outside = [i for i in indices if not 0 <= i < count]
        if outside:
            raise ValueError(f"{plane} slice index {outside[0]} is out of range 0..{count - 1}")
        window = volume_window(volume, request.window)
        made = ((g.index, slice_image(volume, g, window), g) for g in iter_slices(volume, plane, indices))
        return len(indices), made

    def _encode_batch(self, pixels: torch.Tensor, image_options: ImageOptions, keep: bool = False) -> ImageEncoding:
        if self.vision_backend is None:
            return self.model.encode(pixels, image_options.round_pixels_to_bf16, keep_grid_features=keep)
        batch = self.vision_backend.encode(pixels, image_options.round_pixels_to_bf16)
        device, dtype = self.model.device, self.model.dtype
        parts = (batch.cls, batch.patches, batch.grid, batch.region_tokens)
        return ImageEncoding(*(t.to(device, dtype) for t in parts))

    def _model_identity(self) -> str:
        # The engine keeps its model alive, so id() is unique for the cache's lifetime; dtype and device are part
        # of the key because moving the model changes its features.
        identity = f"{type(self.model).__name__}:{id(self.model)}:{self.model.dtype}:{self.model.device}"
        if self.vision_backend is not None:  # features of the two backends differ slightly: never mix them
            identity += f":onnx={self.vision_backend.folder}"
        return identity

    # -- model work (called with the model lock held) ------------------------------------------------------------
    def _run(self, inputs, prompt, options, image_options, on_token, on_region, stop: _StopFlags) -> EngineAnswer:
        start = time.perf_counter()
        encoded_all = self._encode(inputs, image_options, stop.cancelled)
        if encoded_all is None:  # stopped between two encode batches: no text yet
            return _stopped(inputs)
        encodings, fresh = encoded_all
        encoded = time.perf_counter()
        output, streams = self._generate(inputs, prompt, encodings, options, on_token, stop.cancelled)
        generated = time.perf_counter()
        answers = self._decode(inputs, encodings, output, options, streams, on_token, on_region, stop.abandoned)
        done = time.perf_counter()
        total = Timings(encoded - start, generated - encoded, done - generated)
        for answer, is_fresh in zip(answers, fresh, strict=True):
            answer.cached = not is_fresh
            answer.timings = Timings(
                total.encode / max(1, sum(fresh)) if is_fresh else 0.0,
                total.generate / len(answers),
                total.decode / len(answers),
            )
        return EngineAnswer(answers, total, cancelled=output.cancelled or any(a.cancelled for a in answers))

    def _encode(self, inputs: list[_Input], image_options: ImageOptions, should_stop: Callable[[], bool]
                ) -> tuple[list[ImageEncoding], list[bool]] | None:
        """Each input's encoding, from the cache or from batched encode calls; also which were computed. None when
        `should_stop` says so before a batch: an ask of many slices encoded them all before its cancel (or the
        engine's stop) was seen, minutes for the full model on a CPU."""
        found: dict[str, ImageEncoding] = {}
        for x in inputs:
            if x.key not in found:
                hit = self.cache.get(x.key)
                if hit is not None:
                    found[x.key] = hit
        # The same image twice in one request is encoded once.
        missing = list({x.key: x for x in inputs if x.key not in found}.values())
        keep = len(missing) * self._grid_features_bytes() <= KEPT_GRID_FEATURES_BYTES
        for start in range(0, len(missing), self.encode_batch):
            if should_stop():
                return None
            chunk = missing[start : start + self.encode_batch]
            batch = self._encode_batch(torch.stack([x.pixels for x in chunk]), image_options, keep)
            self.encode_calls += 1
            for row, x in enumerate(chunk):
                found[x.key] = batch.select(row)
                self.cache.put(x.key, found[x.key])
        _sync(self.model.device)
        computed = {x.key for x in missing}
        fresh, seen = [], set()
        for x in inputs:
            fresh.append(x.key in computed and x.key not in seen)
            seen.add(x.key)
        return [found[x.key] for x in inputs], fresh

    def _grid_features_bytes(self) -> int:
        """Bytes of one slice's `GridFeatures`: the grid (g x g) and stage 0's upsampled grid (2g x 2g)."""
        side, dim = self.model.config.vision.grid_size, self.model.config.perceiver.dim
        return 5 * side * side * dim * self.model.dtype.itemsize

    def _generate(
        self, inputs, prompt, encodings, options, on_token, should_stop: Callable[[], bool]
    ) -> tuple[GenerationOutput, list[_TextStream] | None]:
        """One batch for all slices; streams text deltas and polls `should_stop` between steps."""
        streams = [_TextStream(self.model.tokenizer) for _ in inputs] if on_token is not None else None
        done = [False] * len(inputs)

        def on_step(tokens: torch.Tensor, finished: torch.Tensor) -> None:
            if streams is None:
                return
            ids, ended = tokens.tolist(), finished.tolist()
            for row, x in enumerate(inputs):
                if done[row]:
                    continue  # rows past their end-of-turn only repeat it
                delta = streams[row].push(ids[row])
                done[row] = ended[row]
                if delta:
                    on_token(x.slice_index, delta)

        output = self.model.generate([prompt] * len(inputs), encodings, options, on_step=on_step,
                                     should_stop=should_stop)
        return output, streams

    def _decode(self, inputs, encodings, output, options, streams, on_token, on_region,
                abandoned: Callable[[], bool]) -> list[Answer]:
        """All rows' codes through the perceiver (batched by code count), then masks onto each slice's grid.
        Once `abandoned()`, no more masks are decoded or mapped: the answers from then on keep their text only and
        are marked cancelled."""
        rows = [self._row(output, row, options) for row in range(len(inputs))]
        if on_token is not None:
            for x, stream, (_, text, _, _) in zip(inputs, streams, rows, strict=True):
                tail = stream.flush(text)
                if tail:
                    on_token(x.slice_index, tail)
        grids = torch.cat([e.grid for e in encodings])
        code_states = [states for *_, states in rows]
        kept = [e.grid_features for e in encodings]
        shared = GridFeatures.cat(kept) if all(k is not None for k in kept) else None
        logits = self.model.decode_regions(grids, code_states, self.mask_decode, grid_features=shared,
                                           should_stop=abandoned)
        answers = []
        eos = self.model.config.llm.eos_token_id
        for x, (ids, text, where, _), mask_logits in zip(inputs, rows, logits, strict=True):
            if abandoned():  # some masks were never decoded: an answer missing them must not pass as complete
                answers.append(Answer(text, [], ids, cancelled=True, slice_index=x.slice_index, slice=x.slice))
                continue
            regions = self._regions(x, ids, text, where, mask_logits)
            cancelled = output.cancelled and (not ids or ids[-1] != eos)
            answers.append(Answer(text, regions, ids, cancelled=cancelled, slice_index=x.slice_index, slice=x.slice))
            if on_region is not None:
                for region in regions:
                    on_region(x.slice_index, region)
        _sync(self.model.device)
        return answers

    def _row(self, output: GenerationOutput, row: int, options: GenerationOptions):
        ids = output.tokens[row, : output.lengths[row]].tolist()
        text = strip_assistant_prefix(self.model.tokenizer.decode(ids, skip_special_tokens=True))
        where, states = self.model.code_states(output, row, options)
        return ids, text, where, states

    def _regions(
        self, x: _Input, ids: list[int], text: str, where: list[int], mask_logits: torch.Tensor
    ) -> list[Region]:
        """One region per decoded mask; the code's label is the phrase the answer puts before it."""
        if mask_logits.shape[0] == 0:
            return []
        source = x.transform.logits_to_source(mask_logits.float())
        names = self.model.region_names(ids, text, where, mask_logits.shape[0])
        return regions_from_logits(names, mask_logits, source, x.slice_index)


def _stopped(inputs: Sequence[_Input | tuple[int, Slice | None]]) -> EngineAnswer:
    """The answer of an ask stopped before any text: an empty, cancelled answer per slice (of its prepared inputs,
    or of `_places`)."""
    places = [(x.slice_index, x.slice) if isinstance(x, _Input) else x for x in inputs]
    empty = [Answer("", cancelled=True, slice_index=index, slice=geometry) for index, geometry in places]
    return EngineAnswer(empty, Timings(), cancelled=True)


def _places(images: Sequence[np.ndarray] | VolumeSlices) -> list[tuple[int, Slice | None]]:
    """Each asked slice's index and geometry, for the answers of an ask stopped while its slices were prepared."""
    if isinstance(images, VolumeSlices):
        return [(g.index, g) for g in iter_slices(images.volume, images.plane, [int(i) for i in images.indices])]
    return [(i, None) for i in range(len(images))]


@dataclass(frozen=True)
class _StopFlags:
    """An ask's two stop signals: `cancel` ends generation (the text so far still gets its masks); `abandon` ends
    the mask decoding too (nobody reads the answer), and so implies `cancel`."""

    cancel: threading.Event | None
    abandon: threading.Event | None

    def abandoned(self) -> bool:
        return self.abandon is not None and self.abandon.is_set()

    def cancelled(self) -> bool:
        return self.abandoned() or (self.cancel is not None and self.cancel.is_set())


def volume_window(volume: Volume, window: str | Window | None) -> Window | None:
    """The one window of an ask about `volume` (see `VolumeSlices.window`), None for a colour volume (not windowed).

    Raises ImagingError when the window cannot map the volume to 8 bits, e.g. the percentile window of a volume
    whose values lie beyond +-1e30: the server calls this before it admits an ask, so that such an ask gets its 422
    instead of failing after its 200."""
    if volume.is_rgb:
        return None
    if isinstance(window, Window):
        return window  # checked where it is applied, like every explicit window
    chosen = choose_window(volume.array, volume.modality, window)
    try:
        return explicit_window(chosen.center, chosen.width)  # the check every slice's windowing makes
    except ImagingError as err:
        raise ImagingError(f"the volume's values give the window {chosen.low:g}..{chosen.high:g}, which 8-bit display "
                           f"cannot use ({err.problem}); rescale its values (or, from Python or the HTTP API, give a "
                           "window center and width)") from None


def slice_image(volume: Volume, geometry: Slice, window: Window | None) -> np.ndarray:
    """The 8-bit RGB image of one of `volume`'s slices that the model is shown, in `window` (`volume_window`'s;
    None for a colour volume, whose non-8-bit values are windowed per slice): the one rule, for the Engine and for
    pictures of what it saw (`medsight ask --overlay`)."""
    if volume.is_rgb:
        return to_rgb(geometry.pixels)
    return to_rgb(geometry.pixels, volume.modality, center=window.center, width=window.width,
                  invert=volume.invert_display)


def check_question(question: str) -> None:
    """Refuse a blank question: it still makes a prompt, and the model answers it with whatever it likes."""
    if not question.strip():
        raise ValueError("the question is empty; ask something about the image")


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so stage timings measure the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

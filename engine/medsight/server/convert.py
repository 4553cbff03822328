"""Engine results -> API schemas, and API options -> engine options."""

from __future__ import annotations

from medsight.engine import EngineAnswer, SliceAnswer, SliceRegion
from medsight.imaging import Window
from medsight.imaging.window import explicit_window, preset_window
from medsight.model.generation import GenerationOptions
from medsight.model.medsight import ImageOptions
from medsight.server import schemas
from medsight.server.rle import encode_mask


def generation_options(options: schemas.AskOptions) -> GenerationOptions:
    return GenerationOptions(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        repetition_penalty=options.repetition_penalty,
        seed=options.seed,
        hidden_state_position=options.hidden_state_position,
        no_code_fallback=options.no_code_fallback,
    )


def image_options(options: schemas.AskOptions) -> ImageOptions:
    return ImageOptions(resize_mode=options.resize_mode)


def window(spec: schemas.WindowIn | None, modality: str) -> str | Window | None:
    """The engine's window for an ask about a volume of `modality`, checked by the engine's own rules (preset
    names, which modalities a preset fits, finite values) so a bad window is refused before the job starts.
    Raises ValueError (ImagingError) naming the problem."""
    if spec is None:
        return None
    explicit = spec.center is not None or spec.width is not None
    if explicit and spec.preset is not None:
        # The engine would silently prefer center/width: refuse the ambiguous request instead.
        raise ValueError(f"give a window preset or a center and width, not both (got preset {spec.preset!r}, "
                         f"center {spec.center}, width {spec.width})")
    if explicit:
        if spec.center is None or spec.width is None:
            raise ValueError("a window needs both center and width (or a preset name)")
        return explicit_window(spec.center, spec.width)
    if spec.preset is not None:
        preset_window(spec.preset, modality)
    return spec.preset


def region(r: SliceRegion, with_mask: bool = True) -> schemas.RegionOut:
    """The wire form of a region; streamed region events leave the mask out (the done event carries it once)."""
    return schemas.RegionOut(
        code=r.code,
        label=r.label,
        index=r.index,
        mask=schemas.MaskRLE(**encode_mask(r.mask)) if with_mask else None,
        probability=round(float(r.probability), 6),
        bbox=list(r.bbox) if r.bbox is not None else None,
    )


def slice_answer(plane: str, answer: SliceAnswer) -> schemas.SliceAnswer:
    matrix = answer.slice.slice_to_ras.tolist() if answer.slice is not None else None
    return schemas.SliceAnswer(
        plane=plane,
        index=answer.slice_index,
        text=answer.text,
        regions=[region(r) for r in answer.regions],
        slice_to_ras=matrix,
        cancelled=answer.cancelled,
    )


def ask_response(job_id: str, model_name: str, plane: str, result: EngineAnswer) -> schemas.AskResponse:
    t = result.timings
    return schemas.AskResponse(
        job_id=job_id,
        model=model_name,
        answers=[slice_answer(plane, a) for a in result.answers],
        timings={"encode": t.encode, "generate": t.generate, "decode": t.decode, "total": t.total},
        cancelled=result.cancelled,
    )

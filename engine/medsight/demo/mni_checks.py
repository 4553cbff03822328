"""The demo model on a volume outside its own data: the README's MNI152 T1 template, read as `medsight ask` reads it.

* Words: "Please segment the white matter." over every axial, coronal and sagittal slice; the share of answers
  with a word that never occurs in the training answers (a garbled answer).
* Brain: "Segment the brain." on the axial slices through the brain (brain-mask area >= `BRAIN_SLICE_FRACTION` of
  the largest axial section); Dice of the union of the answer's masks against nilearn's MNI152 brain mask.

Everything goes through `medsight.Engine` (the product's slicing, windowing and decoding).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsight.engine import Engine, VolumeSlices
from medsight.evaluate.metrics import dice
from medsight.imaging import Volume, extract_slice, read_volume, slice_count
from medsight.model.generation import GenerationOptions
from medsight.model.medsight import MedSIGHTModel

from .qa import words

PLANES = ("axial", "coronal", "sagittal")
WHITE_MATTER_Q = "Please segment the white matter."  # the README's main job
BRAIN_Q = "Segment the brain."
#: An axial slice is "through the brain" when its brain-mask area is at least this share of the largest one.
BRAIN_SLICE_FRACTION = 0.25
MAX_NEW_TOKENS = 48
SLICE_BATCH = 32


def readme_volumes(folder: str | Path) -> tuple[Volume, Volume]:
    """The README's MNI152 T1 volume (nilearn's template at 2 mm, saved as NIfTI and read back as `medsight ask`
    reads it) and nilearn's MNI152 brain mask on the same grid, read the same way."""
    import nibabel
    from nilearn import datasets

    folder = Path(folder)
    nibabel.save(datasets.load_mni152_template(resolution=2), folder / "mni152_t1.nii.gz")
    nibabel.save(datasets.load_mni152_brain_mask(resolution=2), folder / "mni152_brain_mask.nii.gz")
    return read_volume(folder / "mni152_t1.nii.gz"), read_volume(folder / "mni152_brain_mask.nii.gz")


def _ask(engine: Engine, volume: Volume, plane: str, indices: Sequence[int], question: str):
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    for b in range(0, len(indices), SLICE_BATCH):
        yield from engine.ask(VolumeSlices(volume, plane, list(indices[b : b + SLICE_BATCH])), question, options)


def unknown_word_sweep(engine: Engine, volume: Volume, vocabulary: set[str], question: str = WHITE_MATTER_Q,
                       planes: Sequence[str] = PLANES) -> dict:
    """``question`` about every slice of ``volume`` in each plane: per plane and in all, the answers with a word
    outside ``vocabulary`` (``{"n", "with_unknown", "share", "examples", "answers"}``)."""
    out: dict = {"question": question, "planes": {}}
    for plane in planes:
        answers = [a.text for a in _ask(engine, volume, plane, range(slice_count(volume, plane)), question)]
        bad = [a for a in answers if words(a) - vocabulary]
        out["planes"][plane] = {"n": len(answers), "with_unknown": len(bad), "share": len(bad) / len(answers),
                                "examples": bad[:3], "answers": answers}
    n = sum(p["n"] for p in out["planes"].values())
    bad_n = sum(p["with_unknown"] for p in out["planes"].values())
    out.update(n=n, with_unknown=bad_n, share=bad_n / n if n else None)
    return out


def brain_dice(engine: Engine, volume: Volume, brain_mask: Volume, question: str = BRAIN_Q,
               min_fraction: float = BRAIN_SLICE_FRACTION) -> dict:
    """Dice of the answer's masks (union) against ``brain_mask`` on the axial slices through the brain."""
    if brain_mask.array.shape != volume.array.shape:
        raise ValueError(f"brain mask shape {brain_mask.array.shape} is not the volume's {volume.array.shape}")
    mask = brain_mask.array > 0.5
    count = slice_count(volume, "axial")
    areas = np.array([extract_slice(brain_mask, "axial", k).take(mask).sum() for k in range(count)])
    indices = [int(k) for k in np.flatnonzero(areas >= min_fraction * areas.max())]
    per_slice, no_mask = [], 0
    for answer in _ask(engine, volume, "axial", indices, question):
        gt = answer.slice.take(mask)
        pred = np.zeros(gt.shape, bool)
        for region in answer.regions:
            pred |= region.mask.astype(bool)
        no_mask += not answer.regions
        per_slice.append(dice(pred, gt))
    return {"question": question, "slices": indices, "n": len(per_slice), "answers_without_mask": no_mask,
            "dice_mean": float(np.mean(per_slice)) if per_slice else None, "dice_per_slice": per_slice}


def mni_checks(model: MedSIGHTModel | Engine, vocabulary: set[str], planes: Sequence[str] = PLANES) -> dict:
    """Both checks on the README's MNI152 volume."""
    engine = model if isinstance(model, Engine) else Engine(model)
    with tempfile.TemporaryDirectory(prefix="medsight_mni_") as tmp:
        volume, brain_mask = readme_volumes(tmp)
        return {"white_matter": unknown_word_sweep(engine, volume, vocabulary, planes=planes),
                "brain": brain_dice(engine, volume, brain_mask)}


def mni_markdown(mni: dict) -> str:
    wm, brain = mni["white_matter"], mni["brain"]
    lines = ["## The README's MNI152 volume", "",
             f"\"{wm['question']}\" on every slice: answers with a word that never occurs in the training answers:",
             "", "| plane | slices | with such a word | share |", "|---|---|---|---|"]
    for plane, v in wm["planes"].items():
        lines.append(f"| {plane} | {v['n']} | {v['with_unknown']} | {100 * v['share']:.1f} % |")
    lines.append(f"| all | {wm['n']} | {wm['with_unknown']} | {100 * (wm['share'] or 0):.1f} % |")
    dice_mean = brain["dice_mean"]
    lines += ["", f"\"{brain['question']}\" on {brain['n']} axial slices through the brain (brain-mask area >= "
              f"{BRAIN_SLICE_FRACTION:g} of the largest): mean Dice against nilearn's MNI152 brain mask "
              f"**{'n/a' if dice_mean is None else f'{dice_mean:.3f}'}** ({brain['answers_without_mask']} answers "
              "without a mask count as Dice 0)."]
    return "\n".join(lines)

"""Synthetic and template-based sources: abdominal CT phantoms, MNI152 brain MRI subjects, chest X-ray-like images.

Everything is generated offline from a ``numpy.random.Generator``; the same generator state gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsight.imaging import Volume
from medsight.imaging.volume import volume_from_ras

# ----------------------------------------------------------------------------------------------------------------
# Abdominal CT phantom (Hounsfield units)

#: Nominal HU per tissue; each phantom jitters them a little (test bounds use these +- 15 HU).
CT_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft": 40.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 150.0,
    "medulla": 30.0,
    "bone": 700.0,
    "vessel": 170.0,
    "lesion": 10.0,
}


@dataclass
class Phantom:
    """A volume with its structure masks (``[k, j, i]`` bool arrays on the volume grid)."""

    volume: Volume
    masks: dict[str, np.ndarray]


def _ellipsoid(grid: tuple[np.ndarray, np.ndarray, np.ndarray], centre, radii) -> np.ndarray:
    z, y, x = grid
    d2 = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    return d2 + ((z - centre[2]) / radii[2]) ** 2 <= 1


def make_ct_phantom(
    rng: np.random.Generator, size: int = 128, n_slices: int = 36, spacing: tuple[float, float, float] = (2.8, 2.8, 5.0)
) -> Phantom:
    """An abdominal CT phantom in HU with jittered anatomy: body, fat, liver (+ lesions), spleen, kidneys, spine.

    Axes follow LPS (identity direction): +i is patient left, +j posterior, +k superior, so the product's
    axial slicing shows the liver on the image left, as radiologists expect.
    """
    sx, sy, sz = spacing
    x = (np.arange(size) - (size - 1) / 2) * sx
    y = (np.arange(size) - (size - 1) / 2) * sy
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * sz
    grid = np.meshgrid(z, y, x, indexing="ij")
    _, yy, xx = grid
    u = rng.uniform
    hu = {k: v + (rng.normal(0, 5) if k not in ("air", "bone") else 0.0) for k, v in CT_HU.items()}

    a, b = u(132, 162), u(95, 120)
    cx, cy = rng.normal(0, 4), rng.normal(0, 4)
    fat = u(8, 22)
    body = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    inner = ((xx - cx) / (a - fat)) ** 2 + ((yy - cy) / (b - fat)) ** 2 <= 1
    vol = np.full(xx.shape, hu["air"], np.float32)
    vol[body] = hu["fat"]
    vol[inner] = hu["soft"]
    # Bowel gas and fluid pockets anteriorly make the background less uniform (painted first, organs override).
    for _ in range(int(rng.integers(3, 8))):
        c = (cx + u(-0.5, 0.6) * a, cy - u(0.1, 0.7) * b, u(z[0], z[-1]))
        r = (u(8, 20), u(8, 16), u(10, 25))
        vol[_ellipsoid(grid, c, r) & inner] = hu["air"] if rng.random() < 0.5 else 10.0

    # Painting order resolves overlaps (later organs win); masks are trimmed the same way below.
    spine_c = (cx + rng.normal(0, 3), cy + 0.62 * b)
    spine_r = u(15, 20)
    vertebra = (xx - spine_c[0]) ** 2 + (yy - spine_c[1]) ** 2 <= spine_r**2
    canal = (xx - spine_c[0]) ** 2 + (yy - spine_c[1] - spine_r - 8) ** 2 <= 7**2
    process = (np.abs(xx - spine_c[0]) < 5) & (yy > spine_c[1] + spine_r + 12) & (yy < spine_c[1] + spine_r + 35)
    vol[(vertebra | process) & inner] = hu["bone"]
    vol[canal & inner] = 20.0
    for dx, r, v in ((u(12, 20), u(9, 13), hu["vessel"]), (-u(18, 26), u(10, 13), hu["vessel"] - 50)):  # aorta, IVC
        vol[((xx - spine_c[0] - dx) ** 2 + (yy - spine_c[1] + spine_r + r + 3) ** 2 <= r**2)] = v

    organs = {}
    for side, name in ((-1, "right kidney"), (1, "left kidney")):
        c = (cx + side * u(55, 72), cy + 0.42 * b + rng.normal(0, 5), (-12.0 if side < 0 else 0.0) + rng.normal(0, 8))
        r = (u(22, 28), u(28, 36), u(45, 60))
        # Perirenal fat first: in a real abdomen the fat around kidneys and spleen is what outlines them.
        rim = u(5, 12)
        vol[_ellipsoid(grid, c, tuple(v + rim for v in r)) & inner & (vol < 100)] = hu["fat"]  # spares bone, vessels
        kid = _ellipsoid(grid, c, r) & inner
        vol[kid] = hu["kidney"]
        vol[_ellipsoid(grid, c, tuple(0.5 * v for v in r)) & kid] = hu["medulla"]  # renal sinus / medulla
        organs[name] = kid
    c = (cx + u(0.45, 0.6) * a, cy + u(0.15, 0.35) * b, u(15, 45))
    r = (u(22, 32), u(35, 50), u(40, 55))
    rim = u(4, 9)
    spleen_fat = _ellipsoid(grid, c, tuple(v + rim for v in r)) & inner
    vol[spleen_fat] = hu["fat"]
    spleen = _ellipsoid(grid, c, r) & inner
    vol[spleen] = hu["spleen"]
    organs["spleen"] = spleen
    for name in ("right kidney", "left kidney"):  # painted over: keep masks exclusive, like the voxel values
        organs[name] &= ~spleen_fat
    c = (cx - u(0.3, 0.42) * a, cy - u(0.0, 0.2) * b, u(10, 40))
    r = (u(55, 75), u(50, 70), u(55, 75))
    lobe_c = (c[0] + u(35, 55), c[1] - u(15, 35), c[2] + u(5, 20))
    liver = (_ellipsoid(grid, c, r) | _ellipsoid(grid, lobe_c, tuple(v * u(0.45, 0.6) for v in r))) & inner
    liver &= ~ndimage.binary_dilation(vertebra, iterations=2)
    vol[liver] = hu["liver"]
    organs["liver"] = liver
    for name in ("right kidney", "left kidney", "spleen"):  # the liver painted over them: keep masks exclusive
        organs[name] &= ~liver

    lesion = np.zeros_like(liver)
    n_lesions = int(rng.choice([0, 0, 1, 1, 2, 3]))
    core = ndimage.binary_erosion(liver, iterations=3)
    idx = np.argwhere(core)
    for _ in range(n_lesions if len(idx) else 0):
        k, j, i = idx[rng.integers(len(idx))]
        rad = u(10, 20)  # mm: 7-14 px across on the 112 px slices
        lesion |= _ellipsoid(grid, (x[i], y[j], z[k]), (rad, rad * u(0.8, 1.2), rad * u(0.8, 1.2))) & liver
    vol[lesion] = hu["lesion"] + rng.normal(0, 4)
    organs["lesion"] = lesion

    # Partial-volume blur, then scanner noise; both jittered so phantoms differ in texture too.
    vol = ndimage.gaussian_filter(vol, sigma=(0.4, u(0.5, 0.9), u(0.5, 0.9)))
    vol = vol + rng.normal(0, u(10, 20), vol.shape).astype(np.float32)
    volume = Volume(
        vol.astype(np.float32),
        spacing=spacing,
        origin=(float(x[0]), float(y[0]), float(z[0])),
        modality="CT",
        source="demo:ct_phantom",
    )
    return Phantom(volume, {k: organs[k] for k in ("liver", "spleen", "left kidney", "right kidney", "lesion")})


# ----------------------------------------------------------------------------------------------------------------
# Brain MRI from the MNI152 template


@dataclass(frozen=True)
class MNITemplate:
    """The MNI152 T1 template and its tissue maps, ``[x, y, z]`` arrays in RAS with a 4x4 affine."""

    t1: np.ndarray
    gm: np.ndarray  # grey-matter probability
    wm: np.ndarray  # white-matter probability
    brain: np.ndarray  # bool brain mask
    affine: np.ndarray


def load_mni(resolution: int = 2) -> MNITemplate:
    """nilearn's bundled MNI152 template (no download). Loading takes about a second: callers that make many
    subjects load it once and pass it on (`build.generate_samples`)."""
    from nilearn import datasets  # test/dev dependency: import only when the brain source is used

    def arr(img) -> np.ndarray:
        return np.asarray(img.dataobj, dtype=np.float32)

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    brain = datasets.load_mni152_brain_mask(resolution=resolution)
    return MNITemplate(arr(t1), arr(gm), arr(wm), arr(brain) > 0.5, np.asarray(t1.affine, dtype=float))


def make_brain_subject(rng: np.random.Generator, template: MNITemplate | None = None, lesion_p: float = 0.5) -> Phantom:
    """One synthetic T1 subject: the MNI template under a random affine, bias field, contrast and noise,
    with grey/white matter masks (probability >= 0.5) and, with probability ``lesion_p``, 1-2 ellipsoid lesions.
    """
    t = template or load_mni(2)
    u = rng.uniform
    shape = np.array(t.t1.shape, float)
    # Random affine about the volume centre: anisotropic scaling, rotation mostly in the axial plane, shift.
    ang_z, ang_x = np.radians(u(-7, 7)), np.radians(u(-4, 4))
    rz = np.array([[np.cos(ang_z), -np.sin(ang_z), 0], [np.sin(ang_z), np.cos(ang_z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ang_x), -np.sin(ang_x)], [0, np.sin(ang_x), np.cos(ang_x)]])
    m = rz @ rx @ np.diag(1.0 / u(0.92, 1.08, 3))  # maps output voxel to input voxel
    centre = (shape - 1) / 2
    offset = centre - m @ centre + rng.normal(0, 1.5, 3)

    def warp(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(a, m, offset=offset, order=1, mode="constant", cval=0.0)

    t1, gm_p, wm_p = warp(t.t1), warp(t.gm), warp(t.wm)
    gm, wm = gm_p >= 0.5, wm_p >= 0.5
    tissue = gm | wm

    lesion = np.zeros_like(gm)
    if rng.random() < lesion_p:
        idx = np.argwhere(ndimage.binary_erosion(tissue, iterations=4))
        ii, jj, kk = np.meshgrid(*(np.arange(n) for n in t1.shape), indexing="ij")
        for _ in range(int(rng.integers(1, 3))):
            c = idx[rng.integers(len(idx))]
            r = u(4.0, 7.0, 3)
            d2 = ((ii - c[0]) / r[0]) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((kk - c[2]) / r[2]) ** 2
            one = (d2 <= 1) & tissue
            # Soft edge so the lesion blends like a real one. Mostly T1-hypointense (infarcts, demyelination,
            # tumours); the rarer bright ones often vanish in the window's clipped white matter and are then unlabelled.
            factor = u(0.35, 0.6) if rng.random() < 0.75 else u(1.3, 1.6)
            weight = np.clip(1.5 - d2, 0, 1) * tissue
            t1 = t1 * (1 + (factor - 1) * weight)
            lesion |= one
    gm &= ~lesion
    wm &= ~lesion

    # Contrast (gamma), smooth multiplicative bias field, arbitrary scanner scale, Rician-like noise.
    t1 = np.clip(t1, 0, None) ** u(0.8, 1.25)
    axes = [np.linspace(0, np.pi, n) for n in t1.shape]
    bias = np.ones_like(t1)
    for ax, coord in enumerate(axes):
        sh = [1, 1, 1]
        sh[ax] = -1
        bias = bias * (1 + u(-0.08, 0.08) * np.cos(coord + u(0, np.pi))).reshape(sh)
    t1 = t1 * bias * u(300, 1200)
    sigma = u(0.01, 0.04) * float(t1.max())
    t1 = np.hypot(t1 + rng.normal(0, sigma, t1.shape), rng.normal(0, sigma, t1.shape)).astype(np.float32)

    volume = volume_from_ras(t1, t.affine, modality="MR", source="demo:mni152")
    masks = {
        name: np.ascontiguousarray(mk.transpose(2, 1, 0))
        for name, mk in (("grey matter", gm), ("white matter", wm), ("lesion", lesion))
    }
    return Phantom(volume, masks)


# ----------------------------------------------------------------------------------------------------------------
# Chest X-ray-like 2D images


@dataclass
class Image2D:
    """A single-channel 2D image (attenuation-like units, bright = dense) with structure masks."""

    pixels: np.ndarray
    masks: dict[str, np.ndarray]


def make_cxr(rng: np.random.Generator, size: int = 128, nodule_p: float = 0.4) -> Image2D:
    """A PA chest X-ray-like image: thorax, lungs (patient right on image left), heart, ribs, optional nodule."""
    u = rng.uniform
    v, h = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]  # v down, h right
    img = np.full(h.shape, 0.05)
    thorax = (h / u(0.8, 0.92)) ** 2 + ((v - 0.1) / u(1.0, 1.15)) ** 2 <= 1
    img[thorax] = 0.6
    img[(np.abs(h - rng.normal(0, 0.02)) < u(0.1, 0.14)) & thorax] = 0.75  # mediastinum / spine

    lungs = {}
    for side, name in ((-1, "right lung"), (1, "left lung")):
        cx, cy = side * u(0.33, 0.42), u(-0.08, 0.04)
        ax, ay = u(0.22, 0.28), u(0.48, 0.58)
        dome = cy + ay * u(0.65, 0.8) + 0.2 * ((h - cx) / ax) ** 2  # diaphragm, lower at the costophrenic angle
        lungs[name] = (((h - cx) / ax) ** 2 + ((v - cy) / ay) ** 2 <= 1) & (v < dome) & thorax
    heart = ((h - u(0.06, 0.14)) / u(0.2, 0.27)) ** 2 + ((v - u(0.22, 0.32)) / u(0.17, 0.22)) ** 2 <= 1
    for name in lungs:
        lungs[name] &= ~heart
        img[lungs[name]] = u(0.15, 0.25)
    img[heart & thorax] = 0.8
    heart &= thorax
    # Ribs: bright curved bands across the lungs.
    ribs = np.zeros_like(heart)
    for n in range(9):
        base = -0.55 + n * u(0.115, 0.13)
        ribs |= np.abs(v - (base + 0.25 * h**2)) < 0.018
    img[ribs & (lungs["right lung"] | lungs["left lung"])] += 0.15

    lesion = np.zeros_like(heart)
    if rng.random() < nodule_p:
        lung = lungs["right lung"] if rng.random() < 0.5 else lungs["left lung"]
        idx = np.argwhere(ndimage.binary_erosion(lung, iterations=4))
        if len(idx):
            r0, c0 = idx[rng.integers(len(idx))]
            rad = u(0.07, 0.12) * size / 2
            yy, xx = np.mgrid[0:size, 0:size]
            lesion = ((yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2) & lung
            img[lesion] += u(0.3, 0.45)
    img = ndimage.gaussian_filter(img, u(0.6, 1.2)) ** u(0.85, 1.15)
    img = img + rng.normal(0, u(0.01, 0.03), img.shape)
    return Image2D(img.astype(np.float32), {"right lung": lungs["right lung"], "left lung": lungs["left lung"],
                                            "heart": heart, "lesion": lesion})

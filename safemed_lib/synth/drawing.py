"""Drawing a scene as an image: the canvas, each modality's look, lesions and real-image texture.

Each modality has its own look (CT: round body with a bright bone ring; MRI: brain oval with
grey/white matter; X-ray: dark lungs and bright spine; ultrasound: a speckled fan; dermoscopy: a
pigmented lesion on skin; fundus: an orange-red disc with vessels and a bright optic disc;
microscopy: stained cells; OCT: a horizontal band of retinal layers).

Real medical images that ship inside installed packages (pydicom's and pydicom-data's CT, MR,
X-ray and ultrasound files, scikit-image's ``retina.jpg``, ``microaneurysms.png``, ``ihc.png``,
``cell.png``) give a share of images their *fine* texture: only the high-pass part of a random
crop is added, so the coarse, answer-bearing cues stay synthetic. If they are missing, the
benchmark is simply fully synthetic (scenes record which file was used).
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

class Canvas:
    """An RGB float image in [0, 1] with normalised coordinates (x, y in [0, 1])."""

    def __init__(self, size: int, colour=(0.0, 0.0, 0.0)):
        self.size = size
        c = (np.arange(size) + 0.5) / size
        self.x, self.y = np.meshgrid(c, c)
        self.img = np.empty((size, size, 3), np.float32)
        self.img[:] = colour

    def ellipse(self, cx, cy, rx, ry, angle=0.0):
        """A soft (anti-aliased) mask of an ellipse."""
        dx, dy = self.x - cx, self.y - cy
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
        d = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        edge = 1.0 / (self.size * min(rx, ry))  # one pixel in normalised radius units
        return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)

    def rect(self, x0, y0, x1, y1):
        return ((self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)).astype(np.float32)

    def paint(self, mask, colour, alpha=1.0):
        m = (mask * alpha)[..., None]
        self.img = self.img * (1.0 - m) + np.asarray(colour, np.float32) * m

    def paint_value(self, mask, values):
        """Paint a per-pixel (H, W) or (H, W, 3) value under a mask."""
        v = values if values.ndim == 3 else values[..., None]
        m = mask[..., None]
        self.img = self.img * (1.0 - m) + v * m


def _grey(v):
    return (v, v, v)


# Lesion colours per modality: (bright fill, dark fill); rims take the opposite tone.
LESION_TONES = {
    "CT": (_grey(0.98), _grey(0.02)), "MRI": (_grey(0.98), _grey(0.02)),
    "X-Ray": (_grey(0.97), _grey(0.02)), "Ultrasound": (_grey(0.97), _grey(0.02)),
    "OCT": (_grey(0.98), _grey(0.02)),
    "Fundus": ((1.0, 0.93, 0.30), (0.30, 0.02, 0.02)),
}
FUNDUS_MIXED = ((0.97, 0.97, 0.95), (0.55, 0.25, 0.12))
STAINS = {  # background, cell nuclei, dark lesion, bright lesion
    "H&E": ((0.96, 0.72, 0.84), (0.42, 0.18, 0.55), (0.25, 0.05, 0.35), (1.0, 0.98, 0.99)),
    "IHC (DAB)": ((0.88, 0.89, 0.97), (0.42, 0.48, 0.78), (0.40, 0.20, 0.06), (1.0, 1.0, 1.0)),
    "Giemsa": ((0.62, 0.62, 0.92), (0.22, 0.12, 0.52), (0.12, 0.04, 0.30), (1.0, 1.0, 1.0)),
    "Masson trichrome": ((0.55, 0.82, 0.72), (0.62, 0.10, 0.18), (0.45, 0.02, 0.08),
                         (1.0, 1.0, 1.0)),
}
DERM_COLOURS = {"nevus": (0.45, 0.27, 0.15), "keratosis": (0.86, 0.78, 0.45),
                "vascular": (0.78, 0.08, 0.16), "melanoma": ((0.12, 0.07, 0.05), (0.35, 0.42, 0.58))}


def _draw_background(cv: Canvas, scene: dict, rng: np.random.Generator) -> np.ndarray:
    """Draw the modality's look; returns the body mask (where real texture may be added)."""
    m, anat = scene["modality"], scene.get("anatomy")
    j = lambda s=0.02: float(rng.uniform(-s, s))  # noqa: E731  small jitter
    if m == "CT":
        if anat == "brain":
            body = cv.ellipse(0.5 + j(), 0.5 + j(), 0.42, 0.44)
            cv.paint(body, _grey(0.95))
            cv.paint(cv.ellipse(0.5, 0.5, 0.35, 0.37), _grey(0.45))
        else:
            ry = 0.34 if anat != "abdomen" else 0.37
            body = cv.ellipse(0.5 + j(), 0.5 + j(), 0.46, ry)
            cv.paint(body, _grey(0.80))
            cv.paint(cv.ellipse(0.5, 0.5, 0.43, ry - 0.03), _grey(0.45))
            cv.paint(cv.ellipse(0.5, 0.5 + ry - 0.10, 0.06, 0.06), _grey(0.95))  # vertebra
            if anat == "chest":
                for cx in (0.28, 0.72):
                    cv.paint(cv.ellipse(cx + j(), 0.48 + j(), 0.15, 0.22), _grey(0.06))
            elif anat == "abdomen":
                cv.paint(cv.ellipse(0.33 + j(), 0.45 + j(), 0.20, 0.20), _grey(0.66))  # liver
            else:  # pelvis: femoral heads
                for cx in (0.22, 0.78):
                    cv.paint(cv.ellipse(cx + j(), 0.52 + j(), 0.10, 0.10), _grey(0.95))
        return body
    if m == "MRI":
        gm, wm, csf = {"T1-weighted": (0.42, 0.72, 0.06), "T2-weighted": (0.55, 0.30, 0.95),
                       "FLAIR": (0.58, 0.36, 0.06)}[scene["sequence"]]
        body = cv.ellipse(0.5 + j(), 0.5 + j(), 0.38, 0.46)
        cv.paint(body, _grey(0.25))                                   # scalp / skull
        cv.paint(cv.ellipse(0.5, 0.5, 0.35, 0.43), _grey(gm))         # grey matter
        cv.paint(cv.ellipse(0.5, 0.5, 0.28, 0.36), _grey(wm))         # white matter
        for cx in (0.44, 0.56):                                       # ventricles
            cv.paint(cv.ellipse(cx, 0.5, 0.04, 0.13, angle=0.25 if cx < 0.5 else -0.25),
                     _grey(csf))
        return body
    if m == "X-Ray":
        body = cv.rect(0.06, 0.0, 0.94, 1.0)
        cv.paint(body, _grey(0.55))
        for cx in (0.29, 0.71):
            cv.paint(cv.ellipse(cx + j(), 0.50 + j(), 0.19, 0.34), _grey(0.14))
        for k in range(5):                                            # ribs
            yk = 0.22 + 0.13 * k
            cv.paint(cv.ellipse(0.5, yk + 0.25, 0.42, 0.26) - cv.ellipse(0.5, yk + 0.25, 0.41, 0.25),
                     _grey(0.45), alpha=0.6)
        cv.paint(cv.rect(0.46, 0.0, 0.54, 1.0), _grey(0.88))          # spine
        cv.paint(cv.ellipse(0.56, 0.72, 0.14, 0.12), _grey(0.6))      # heart
        return body
    if m == "Ultrasound":
        r = np.hypot(cv.x - 0.5, cv.y - 0.02)
        ang = np.arctan2(cv.x - 0.5, cv.y - 0.02)
        fan = ((r < 0.95) & (r > 0.08) & (np.abs(ang) < 0.72)).astype(np.float32)
        speckle = rng.gamma(4.0, 0.25, size=fan.shape).astype(np.float32)
        tissue = np.full(fan.shape, 0.42, np.float32)
        organ = np.zeros_like(fan)
        if anat == "liver":
            tissue[:] = 0.5
            organ = np.clip(cv.ellipse(0.5, 1.15, 0.8, 0.32) - cv.ellipse(0.5, 1.15, 0.76, 0.28), 0, 1)
            tissue = tissue * (1 - organ) + 0.95 * organ                # diaphragm
        elif anat == "kidney":
            cortex = cv.ellipse(0.5 + j(), 0.55 + j(), 0.32, 0.18)
            sinus = cv.ellipse(0.5, 0.55, 0.18, 0.07)
            tissue = tissue * (1 - cortex) + 0.2 * cortex
            tissue = tissue * (1 - sinus) + 0.9 * sinus
        elif anat == "bladder":
            b = cv.ellipse(0.5 + j(), 0.58 + j(), 0.28, 0.22)
            tissue = tissue * (1 - b) + 0.03 * b
        else:  # thyroid: two lobes and a dark trachea shadow
            for cx in (0.3, 0.7):
                lobe = cv.ellipse(cx + j(), 0.45 + j(), 0.16, 0.11)
                tissue = tissue * (1 - lobe) + 0.72 * lobe
            t = cv.ellipse(0.5, 0.32, 0.07, 0.07)
            tissue = tissue * (1 - t) + 0.02 * t
        cv.paint_value(fan, np.clip(tissue * speckle, 0, 1))
        return fan
    if m == "Dermoscopy":
        tone = np.array((0.90, 0.70, 0.60)) + rng.uniform(-0.04, 0.04, 3)
        cv.img[:] = tone.astype(np.float32)
        vign = np.clip((np.hypot(cv.x - 0.5, cv.y - 0.5) - 0.48) / 0.1, 0, 1)
        cv.paint(vign, (0.05, 0.04, 0.04))
        return 1.0 - vign
    if m == "Fundus":
        cv.img[:] = 0.02
        disc = cv.ellipse(0.5, 0.5, 0.47, 0.47)
        shade = np.clip(1.0 - 0.5 * np.hypot(cv.x - 0.5, cv.y - 0.5), 0, 1)
        cv.paint_value(disc, np.stack([0.85 * shade, 0.38 * shade, 0.14 * shade], -1))
        ox = 0.76 if anat == "right eye" else 0.24                    # optic disc side
        oy = 0.5 + j()
        dx = (cv.x - ox) if ox < 0.5 else (ox - cv.x)                  # away from the disc
        for a in (-0.9, -0.35, 0.35, 0.9):                              # four vessel arcades
            f = oy + a * dx * (0.6 + 0.4 * dx)
            vessel = np.clip((0.011 - np.abs(cv.y - f)) * cv.size + 0.5, 0, 1) * (dx > 0) * (dx < 0.6)
            cv.paint(vessel * disc, (0.55, 0.08, 0.06), alpha=0.8)
        cv.paint(cv.ellipse(ox, oy, 0.085, 0.085), (1.0, 0.92, 0.72))
        cv.paint(cv.ellipse(1 - ox + (0.06 if ox < 0.5 else -0.06), 0.5, 0.06, 0.06),
                 (0.45, 0.15, 0.06), alpha=0.6)                        # macula
        return disc
    if m == "Microscopy":
        bg, nuc, _, _ = STAINS[scene["stain"]]
        cv.img[:] = np.asarray(bg, np.float32)
        for _ in range(28):                                            # background cells
            cx, cy = rng.uniform(0, 1, 2)
            cv.paint(cv.ellipse(cx, cy, 0.035, 0.03, angle=rng.uniform(0, 3)), nuc, alpha=0.75)
        return np.ones_like(cv.x)
    if m == "OCT":
        cv.img[:] = 0.04
        yc = 0.5 + j(0.03)
        if anat == "fovea":
            centre = yc + 0.10 * np.exp(-((cv.x - 0.5) / 0.10) ** 2)     # foveal pit
        elif anat == "optic disc":
            centre = yc + 0.0 * cv.x
        else:
            centre = yc + 0.08 * (cv.x - 0.5)                           # flat, tilted
        band = np.zeros_like(cv.x)
        for off, val, half in ((-0.10, 0.55, 0.025), (-0.04, 0.30, 0.03), (0.03, 0.62, 0.03),
                               (0.09, 0.95, 0.02)):
            layer = (np.abs(cv.y - (centre + off)) < half).astype(np.float32)
            band = np.maximum(band, layer * val)
        if anat == "optic disc":                                        # cup: no layers at centre
            band = band * (np.abs(cv.x - 0.5) > 0.12)
        cv.paint_value(np.ones_like(cv.x), band[..., None] * np.ones(3, np.float32) * 0.96 + 0.04)
        return (band > 0).astype(np.float32)
    raise ValueError(f"unknown modality {m!r}")


def _draw_lesion(cv: Canvas, scene: dict, les: dict, rng: np.random.Generator) -> None:
    m, style = scene["modality"], scene["style"]
    cx, cy, r = les["cx"], les["cy"], les["r"]
    ry = r * les["aspect"]
    rim_w = max(1.6 / cv.size, 0.22 * r)
    if m == "Dermoscopy":
        if style == "melanoma":  # irregular, dark with blue-grey veil (mixed)
            ang = np.arctan2(cv.y - cy, cv.x - cx)
            rr = np.hypot((cv.x - cx) / r, (cv.y - cy) / ry)
            wob = 1.0 + 0.22 * np.sin(3 * ang + les["phase"]) + 0.1 * np.sin(5 * ang)
            mask = np.clip((wob - rr) * cv.size * r + 0.5, 0, 1)
            cv.paint_value(mask, _checker(cv, cx, cy, r, *DERM_COLOURS["melanoma"]))
        else:
            mask = cv.ellipse(cx, cy, r, ry, les["angle"])
            col = DERM_COLOURS[style]
            if style == "keratosis":
                cv.paint(cv.ellipse(cx, cy, r + rim_w, ry + rim_w, les["angle"]), (0.35, 0.22, 0.12))
            cv.paint(mask, col)
        return
    if m == "Microscopy":
        _, _, dark, bright = STAINS[scene["stain"]]
    else:
        bright, dark = LESION_TONES.get(m, (_grey(0.98), _grey(0.02)))
    outer = cv.ellipse(cx, cy, r + rim_w, ry + rim_w, les["angle"])
    inner = cv.ellipse(cx, cy, r, ry, les["angle"])
    if style == "bright":
        cv.paint(outer, dark if m != "Fundus" else (0.5, 0.2, 0.05))
        cv.paint(inner, bright)
    elif style == "dark":
        cv.paint(outer, bright if m != "Fundus" else (0.95, 0.6, 0.4))
        cv.paint(inner, dark)
    else:  # mixed: a coarse checkerboard (heterogeneous texture)
        a, b = (FUNDUS_MIXED if m == "Fundus" else (bright, dark))
        cv.paint_value(outer, _checker(cv, cx, cy, r + rim_w, a, b))


def _checker(cv: Canvas, cx, cy, r, a, b) -> np.ndarray:
    cell = max(2.0 / cv.size, 0.42 * r)
    k = (np.floor((cv.x - cx) / cell) + np.floor((cv.y - cy) / cell)) % 2
    return np.where(k[..., None] > 0, np.asarray(a, np.float32), np.asarray(b, np.float32))


# ----------------------------------------------------------------------------- real textures

REAL_SOURCES = {  # modality -> (kind, name): pydicom test files or scikit-image data files
    "CT": (("dicom", "CT_small.dcm"), ("dicom", "693_UNCR.dcm")),
    "MRI": (("dicom", "MR_small.dcm"), ("dicom", "MR2_UNCR.dcm")),
    "X-Ray": (("dicom", "RG1_UNCR.dcm"), ("dicom", "RG3_UNCR.dcm")),
    "Ultrasound": (("dicom", "US1_UNCR.dcm"), ("dicom", "OBXXXX1A.dcm")),
    "Fundus": (("skimage", "retina.jpg"), ("skimage", "microaneurysms.png")),
    "Microscopy": (("skimage", "ihc.png"), ("skimage", "cell.png")),
}


@lru_cache(maxsize=None)
def _real_image(kind: str, name: str) -> np.ndarray | None:
    """A real image as a float (H, W) luminance array in [0, 1], at most 384 px; None if absent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "dicom":
                import pydicom
                from pydicom.data import get_testdata_file
                path = get_testdata_file(name)
                if path is None:
                    return None
                ds = pydicom.dcmread(path)
                a = ds.pixel_array
                if getattr(ds, "PhotometricInterpretation", "") == "PALETTE COLOR":
                    from pydicom.pixels import apply_color_lut
                    a = apply_color_lut(a, ds)
                a = np.asarray(a, np.float32)
                if a.ndim == 3 and a.shape[-1] == 3:
                    a = a @ np.array([0.299, 0.587, 0.114], np.float32)
                elif a.ndim == 3:
                    a = a[0]
                if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
                    a = a.max() - a
            else:
                import skimage
                path = Path(skimage.__file__).parent / "data" / name
                if not path.is_file():
                    return None
                a = np.asarray(Image.open(path).convert("L"), np.float32)
    except Exception:  # a missing plugin or file: the benchmark stays fully synthetic
        return None
    lo, hi = np.percentile(a, (1, 99))
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    im = Image.fromarray((a * 255).astype(np.uint8))
    im.thumbnail((384, 384), Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


def real_sources_available() -> dict[str, list[str]]:
    """Which real images can be read here, per modality (file names)."""
    return {m: [n for k, n in srcs if _real_image(k, n) is not None]
            for m, srcs in REAL_SOURCES.items()}


def _real_texture(modality: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str] | None:
    """The high-pass detail of a random crop of a real image (zero mean, std ~0.07)."""
    from scipy.ndimage import gaussian_filter

    srcs = [(k, n) for k, n in REAL_SOURCES.get(modality, ()) if _real_image(k, n) is not None]
    if not srcs:
        return None
    kind, name = srcs[int(rng.integers(len(srcs)))]
    a = _real_image(kind, name)
    h, w = a.shape
    side = int(min(h, w) * rng.uniform(0.5, 0.9))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray((a[y0:y0 + side, x0:x0 + side] * 255).astype(np.uint8))
    t = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    if rng.random() < 0.5:
        t = t[:, ::-1]
    hp = t - gaussian_filter(t, sigma=size / 14)
    hp = hp / max(float(hp.std()), 1e-3) * 0.06
    return hp.astype(np.float32), name



# ----------------------------------------------------------------------------- a scene

def render(scene: dict, rng: np.random.Generator, real_frac: float = 0.3) -> np.ndarray:
    """Draw a scene as a uint8 (size, size, 3) RGB array; sets ``scene['real_texture']``."""
    cv = Canvas(scene["size"])
    body = _draw_background(cv, scene, rng)
    scene["real_texture"] = None
    if scene["modality"] in REAL_SOURCES and rng.random() < real_frac:
        tex = _real_texture(scene["modality"], scene["size"], rng)
        if tex is not None:
            cv.img = cv.img + (tex[0] * body)[..., None]
            scene["real_texture"] = tex[1]
    for les in scene["lesions"]:
        _draw_lesion(cv, scene, les, rng)
    cv.img = cv.img + rng.normal(0, 0.015, cv.img.shape).astype(np.float32)
    return (np.clip(cv.img, 0, 1) * 255 + 0.5).astype(np.uint8)

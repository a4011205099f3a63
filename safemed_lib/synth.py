"""The embedded offline benchmark: synthetic medical-looking images with VQA in OmniMedVQA's format.

Every image is drawn from a small set of generating parameters (a *scene*): modality, anatomy,
finding, lesion size grade, lesion quadrant, lesion count and a global attribute (MRI sequence,
microscopy stain). Every answer is read off those parameters, and every parameter is carried by a
coarse visual cue (a whole-image layout, a region's intensity or colour, a blob's size bin or
quadrant, 1-4 large blobs), so that a tiny Qwen2-VL (16 merged image tokens at 112 px) can learn
it. Each modality has its own look (CT: round body with a bright bone ring; MRI: brain oval with
grey/white matter; X-ray: dark lungs and bright spine; ultrasound: a speckled fan; dermoscopy: a
pigmented lesion on skin; fundus: an orange-red disc with vessels and a bright optic disc;
microscopy: stained cells; OCT: a horizontal band of retinal layers).

Anti-shortcut design: for each question the answer is uniform over its answer space (the question
types of an image are chosen first, then the scene is sampled so that no answer is favoured),
distractors come from the same space, and option positions are balanced, so a model that reads only
the text is at chance (see :func:`text_only_baseline`).

Real medical images that ship inside installed packages (pydicom's and pydicom-data's CT, MR,
X-ray and ultrasound files, scikit-image's ``retina.jpg``, ``microaneurysms.png``, ``ihc.png``,
``cell.png``) give a share of images their *fine* texture: only the high-pass part of a random
crop is added, so the coarse, answer-bearing cues stay synthetic. If they are missing, the
benchmark is simply fully synthetic (scenes record which file was used).

Layout written by :func:`make_benchmark` (what ``data.load_omnimedvqa`` reads)::

    <root>/Images/Synth-CT/Synth-CT_00000.png ...
    <root>/QA_information/Open-access/Synth-CT.json ...
    <root>/synth_scenes.json      # per-image generating parameters (ignored by the loader)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .records import atomic_write_text

GENERATOR_VERSION = 2  # bump whenever the output changes: cached benchmarks regenerate
GRID = 28
SCENES_FILE = "synth_scenes.json"
STAMP_FILE = "synth_stamp.json"
LETTERS = "ABCDE"

MODALITIES = ("CT", "MRI", "X-Ray", "Ultrasound", "Dermoscopy", "Fundus", "Microscopy", "OCT")
QUESTION_TYPES = ("Modality Recognition", "Anatomy Identification", "Disease Diagnosis",
                  "Lesion Grading", "Other Biological Attributes")
MR, AI, DD, LG, OBA = QUESTION_TYPES

# OmniMedVQA's verbatim `modality_type` strings, typos included.
MODALITY_TYPE = {
    "CT": "CT(Computed Tomography)", "MRI": "MR (Mag-netic Resonance Imaging)", "X-Ray": "X-Ray",
    "Ultrasound": "ultrasound", "Dermoscopy": "Dermoscopy", "Fundus": "Fundus Photography",
    "Microscopy": "Microscopy Images", "OCT": "OCT (Optical Coherence Tomography",
}
DATASET = {m: "Synth-" + m.replace("-", "") for m in MODALITIES}
# Modality Recognition answer space (option texts).
MODALITY_OPTION = {
    "CT": "CT scan", "MRI": "MRI", "X-Ray": "X-ray", "Ultrasound": "Ultrasound",
    "Dermoscopy": "Dermoscopy", "Fundus": "Fundus photography", "Microscopy": "Microscopy",
    "OCT": "Optical coherence tomography",
}

QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
QUADRANT_CENTRE = {"upper left": (0.27, 0.27), "upper right": (0.73, 0.27),
                   "lower left": (0.27, 0.73), "lower right": (0.73, 0.73)}
GRADE_RADIUS = (0.065, 0.10, 0.145, 0.20)        # lesion radius / image size, grades 1..4
GRADE_WORD = ("small", "medium", "large", "very large")
COUNT_WORDS = ("one", "two", "three", "four")
GENERIC_GRADES = ("grade 1", "grade 2", "grade 3", "grade 4")

# Per modality: anatomy question (global layout or lesion quadrant), findings (the first is
# "normal" where the modality has one) with their lesion style, grade names, and the Other
# Biological Attributes question (lesion count, or a global attribute).
SPECS: dict[str, dict[str, Any]] = {
    "CT": dict(ai="anatomy", anatomy=("brain", "chest", "abdomen", "pelvis"),
               findings=("no abnormality", "tumor", "cyst", "abscess"),
               style={"tumor": "bright", "cyst": "dark", "abscess": "mixed"},
               grades=GENERIC_GRADES, oba="count"),
    "MRI": dict(ai="location",
                location=("left frontal lobe", "right frontal lobe", "left occipital lobe",
                          "right occipital lobe"),
                findings=("no abnormality", "glioma", "infarct", "metastasis"),
                style={"glioma": "bright", "infarct": "dark", "metastasis": "mixed"},
                grades=GENERIC_GRADES, oba="sequence",
                sequence=("T1-weighted", "T2-weighted", "FLAIR")),
    "X-Ray": dict(ai="location",
                  location=("left upper zone", "right upper zone", "left lower zone",
                            "right lower zone"),
                  findings=("no finding", "nodule", "cavity", "consolidation"),
                  style={"nodule": "bright", "cavity": "dark", "consolidation": "mixed"},
                  grades=GENERIC_GRADES, oba="count"),
    "Ultrasound": dict(ai="anatomy", anatomy=("liver", "kidney", "bladder", "thyroid"),
                       findings=("no abnormality", "calcification", "cyst", "solid mass"),
                       style={"calcification": "bright", "cyst": "dark", "solid mass": "mixed"},
                       grades=GENERIC_GRADES, oba="count"),
    "Dermoscopy": dict(ai="location", location=QUADRANTS,
                       findings=("melanoma", "benign nevus", "seborrheic keratosis",
                                 "vascular lesion"),
                       style={"melanoma": "melanoma", "benign nevus": "nevus",
                              "seborrheic keratosis": "keratosis",
                              "vascular lesion": "vascular"},
                       grades=GENERIC_GRADES, oba="count"),
    "Fundus": dict(ai="anatomy", anatomy=("left eye", "right eye"),
                   findings=("normal fundus", "haemorrhage", "hard exudates",
                             "cotton wool spots"),
                   style={"haemorrhage": "dark", "hard exudates": "bright",
                          "cotton wool spots": "mixed"},
                   grades=("mild retinopathy", "moderate retinopathy", "severe retinopathy",
                           "proliferative retinopathy"), oba="count"),
    "Microscopy": dict(ai="location", location=QUADRANTS,
                       findings=("normal tissue", "tumor cells", "necrosis", "inflammation"),
                       style={"tumor cells": "dark", "necrosis": "bright",
                              "inflammation": "mixed"},
                       grades=GENERIC_GRADES, oba="stain",
                       stain=("H&E", "IHC (DAB)", "Giemsa", "Masson trichrome")),
    "OCT": dict(ai="anatomy", anatomy=("fovea", "optic disc", "peripheral retina"),
                findings=("normal retina", "drusen", "macular edema", "choroidal neovascularization"),
                style={"drusen": "bright", "macular edema": "dark",
                       "choroidal neovascularization": "mixed"},
                grades=GENERIC_GRADES, oba="count"),
}
for _m, _s in SPECS.items():
    _s["has_normal"] = _m != "Dermoscopy"

# Question templates: a few paraphrases each, chosen at random (independent of the answer).
TEMPLATES = {
    MR: ("What imaging modality was used to acquire this image?",
         "Which imaging technique produced this picture?",
         "What kind of medical image is this?"),
    DD: ("What abnormality is shown in this image?", "What is the most likely diagnosis?",
         "Which finding is present in this image?"),
    LG: ("What is the grade of the lesion?", "How would you grade the lesion in this image?",
         "What severity grade does the lesion have?"),
}
AI_TEMPLATES = {
    "CT": ("Which body region is shown in this CT scan?", "What part of the body is imaged here?"),
    "Ultrasound": ("Which organ is shown in this ultrasound image?",
                   "What organ is being scanned here?"),
    "Fundus": ("Which eye is shown in this fundus photograph?", "Is this the left or the right eye?"),
    "OCT": ("Which retinal region does this OCT scan show?", "Where on the retina was this scan taken?"),
    "MRI": ("Which brain region contains the lesion?", "Where in the brain is the lesion located?"),
    "X-Ray": ("Which lung zone contains the abnormality?", "Where in the lungs is the lesion?"),
    "Dermoscopy": ("In which part of the image is the lesion located?", "Where is the lesion?"),
    "Microscopy": ("In which part of the field is the abnormal area?",
                   "Where is the abnormal region located?"),
}
OBA_TEMPLATES = {
    "count": ("How many lesions are visible?", "How many separate lesions can be seen?"),
    "sequence": ("Which MRI sequence was used?", "What is the weighting of this MR image?"),
    "stain": ("Which stain was used on this specimen?", "What staining method was applied?"),
}
# Chance of 2, 3, 4, 5 options (capped by the answer space), roughly as in OmniMedVQA.
N_OPTIONS_P = {2: 0.08, 3: 0.12, 4: 0.68, 5: 0.12}
TYPE_WEIGHT = {MR: 1.0, AI: 1.2, DD: 1.6, LG: 1.0, OBA: 1.0}


# ----------------------------------------------------------------------------- answer spaces

def answer_space(modality: str, qtype: str) -> tuple[str, ...]:
    """All possible answers (option texts) of one question type for one modality."""
    s = SPECS[modality]
    if qtype == MR:
        return tuple(MODALITY_OPTION[m] for m in MODALITIES)
    if qtype == AI:
        return s[s["ai"]]
    if qtype == DD:
        return s["findings"]
    if qtype == LG:
        return s["grades"]
    if qtype == OBA:
        return COUNT_WORDS if s["oba"] == "count" else s[s["oba"]]
    raise ValueError(f"unknown question type {qtype!r}")


def needs_lesion(modality: str, qtype: str) -> bool:
    """Whether a question can only be asked about an image with a lesion."""
    s = SPECS[modality]
    return qtype == LG or (qtype == AI and s["ai"] == "location") or \
        (qtype == OBA and s["oba"] == "count")


def answer_for(scene: dict, qtype: str) -> str:
    """The answer (option text) to a question of type ``qtype``, read off a scene's parameters."""
    m = scene["modality"]
    s = SPECS[m]
    if qtype == MR:
        return MODALITY_OPTION[m]
    if needs_lesion(m, qtype) and not scene["lesions"]:
        raise ValueError(f"{qtype!r} needs a lesion; scene {scene['image']} has none")
    if qtype == AI:
        if s["ai"] == "anatomy":
            return scene["anatomy"]
        if scene["count"] != 1:
            raise ValueError(f"lesion location is asked only with one lesion ({scene['image']})")
        return s["location"][QUADRANTS.index(scene["lesions"][0]["quadrant"])]
    if qtype == DD:
        return scene["finding"]
    if qtype == LG:
        return s["grades"][scene["grade"] - 1]
    if qtype == OBA:
        return COUNT_WORDS[scene["count"] - 1] if s["oba"] == "count" else scene[s["oba"]]
    raise ValueError(f"unknown question type {qtype!r}")


# ----------------------------------------------------------------------------- drawing

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


# ----------------------------------------------------------------------------- scenes

def _sample_types(modality: str, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` distinct question types for one image, avoiding combinations that would bias an
    answer (e.g. a lesion-only question beside a diagnosis question would exclude 'normal')."""
    s = SPECS[modality]

    def ok(types):
        les = [t for t in types if needs_lesion(modality, t)]
        if s["has_normal"] and DD in types and les:
            return False
        return not (AI in les and OBA in les)  # location needs 1 lesion, count needs 1-4

    import itertools
    combos = [c for c in itertools.combinations(QUESTION_TYPES, k) if ok(c)]
    w = np.array([np.prod([TYPE_WEIGHT[t] for t in c]) for c in combos])
    return list(combos[int(rng.choice(len(combos), p=w / w.sum()))])


def _sample_scene(modality: str, types: Sequence[str], size: int, rng: np.random.Generator,
                  bags: "_Bags | None" = None) -> dict:
    """Generating parameters for one image, such that each asked question's answer is uniform.

    With ``bags``, the answer of each asked question is drawn from a shuffled bag of its answer
    space (per modality and question type), so answers are balanced, not only uniform on average.
    """
    s = SPECS[modality]
    forced = {t: bags.draw((modality, t), answer_space(modality, t)) for t in types
              if t != MR} if bags is not None else {}
    lesion_needed = any(needs_lesion(modality, t) for t in types)
    findings = s["findings"]
    lesion_kinds = findings[1:] if s["has_normal"] else findings
    if DD in types or not lesion_needed:
        finding = forced.get(DD) or findings[int(rng.integers(len(findings)))]
    else:
        finding = lesion_kinds[int(rng.integers(len(lesion_kinds)))]
    normal = s["has_normal"] and finding == findings[0]
    # layout: one lesion (location is defined) or 1-4 lesions (count is asked)
    if s["oba"] != "count":
        multi = False
    elif s["ai"] != "location":
        multi = True
    elif OBA in types:
        multi = True
    elif AI in types:
        multi = False
    else:
        multi = bool(rng.random() < 0.5)
    count = 0 if normal else (int(rng.integers(1, 5)) if multi else 1)
    grade = int(rng.integers(1, 5))
    quads = [int(q) for q in rng.permutation(4)]
    if LG in forced:
        grade = s["grades"].index(forced[LG]) + 1
    if OBA in forced and s["oba"] == "count":
        count = COUNT_WORDS.index(forced[OBA]) + 1
    if AI in forced and s["ai"] == "location":
        q = s["location"].index(forced[AI])
        quads = [q] + [k for k in quads if k != q]
    scene = dict(modality=modality, dataset=DATASET[modality], size=size, finding=finding,
                 style=None if normal else s["style"][finding], layout="multi" if multi else "single",
                 count=count, grade=None if normal else grade,
                 grade_name=None if normal else s["grades"][grade - 1], lesions=[])
    if s["ai"] == "anatomy":
        scene["anatomy"] = s["anatomy"][int(rng.integers(len(s["anatomy"])))]
        scene["anatomy"] = forced.get(AI, scene["anatomy"])
    if s["oba"] in ("sequence", "stain"):
        scene[s["oba"]] = s[s["oba"]][int(rng.integers(len(s[s["oba"]])))]
        scene[s["oba"]] = forced.get(OBA, scene[s["oba"]])
    for q in quads[:count]:
        quad = QUADRANTS[q]
        qx, qy = QUADRANT_CENTRE[quad]
        r = GRADE_RADIUS[grade - 1] * float(rng.uniform(0.94, 1.06))
        cx, cy = qx + float(rng.uniform(-0.025, 0.025)), qy + float(rng.uniform(-0.025, 0.025))
        aspect = float(rng.uniform(0.85, 1.0))
        x0, x1 = (cx - r) * size, (cx + r) * size
        y0, y1 = (cy - r * aspect) * size, (cy + r * aspect) * size
        bbox = [max(0, math.floor(x0)), max(0, math.floor(y0)),
                min(size, math.ceil(x1)), min(size, math.ceil(y1))]
        scene["lesions"].append(dict(quadrant=quad, cx=round(cx, 4), cy=round(cy, 4),
                                     r=round(r, 4), aspect=round(aspect, 4),
                                     angle=round(float(rng.uniform(0, math.pi)), 4),
                                     phase=round(float(rng.uniform(0, 2 * math.pi)), 4),
                                     bbox=bbox, radius_px=round(r * size, 1)))
    scene["bbox"] = scene["lesions"][0]["bbox"] if scene["lesions"] else None
    scene["location"] = scene["lesions"][0]["quadrant"] if count == 1 else None
    return scene


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


# ----------------------------------------------------------------------------- questions

class _Bags:
    """Balanced draws: per key, values come from shuffled bags holding each value once."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.bags = rng, {}

    def draw(self, key, values: Sequence):
        bag = self.bags.setdefault(key, [])
        if not bag:
            bag.extend(values[int(i)] for i in self.rng.permutation(len(values)))
        return bag.pop()


def _make_record(scene: dict, image_rel: str, qtype: str, qid: str,
                 rng: np.random.Generator, positions: _Bags) -> dict:
    m = scene["modality"]
    s = SPECS[m]
    space = answer_space(m, qtype)
    answer = answer_for(scene, qtype)
    ns = list(N_OPTIONS_P)
    n = min(int(rng.choice(ns, p=list(N_OPTIONS_P.values()))), len(space))
    others = [v for v in space if v != answer]
    distract = [others[i] for i in rng.permutation(len(others))[: n - 1]]
    pos = positions.draw(n, range(n))
    options = distract[:pos] + [answer] + distract[pos:]
    if qtype == AI:
        templ = AI_TEMPLATES[m]
    elif qtype == OBA:
        templ = OBA_TEMPLATES[s["oba"]]
    else:
        templ = TEMPLATES[qtype]
    rec = {"dataset": DATASET[m], "question_id": qid, "question_type": qtype,
           "question": templ[int(rng.integers(len(templ)))], "gt_answer": answer,
           "image_path": image_rel}
    rec.update({f"option_{LETTERS[i]}": o for i, o in enumerate(options)})
    rec["modality_type"] = MODALITY_TYPE[m]
    return rec


# ----------------------------------------------------------------------------- the benchmark

def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < GRID or size % GRID:
        raise ValueError(f"size must be a positive multiple of {GRID} (the Qwen2-VL pixel grid), "
                         f"got {size!r}")


def make_benchmark(out_dir: str | Path, n_images: int = 1600, seed: int = 0, size: int = 112, *,
                   questions_per_image: int = 2, real_frac: float = 0.3) -> Path:
    """Write the synthetic benchmark in OmniMedVQA's layout under ``out_dir``; returns the root.

    ``n_images`` images (modalities in turn, so each gets ``n_images / 8``), each with
    ``questions_per_image`` questions of distinct types; ``size`` (a multiple of 28) is the
    image side in pixels; ``real_frac`` is the share of images (in modalities with real
    images available) that get real-image fine texture. Same arguments, same bytes.
    ``out_dir`` must not exist or be empty. Also writes ``synth_scenes.json`` (see
    :func:`load_scenes`).
    """
    _check_size(size)
    if not isinstance(n_images, int) or n_images < len(MODALITIES):
        raise ValueError(f"n_images must be an int >= {len(MODALITIES)}, got {n_images!r}")
    if not 1 <= questions_per_image <= 3:
        raise ValueError(f"questions_per_image must be 1..3, got {questions_per_image}")
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; make_benchmark writes into a fresh folder "
                              f"(use ensure_benchmark for a cached benchmark)")
    qa_dir = root / "QA_information" / "Open-access"
    qa_dir.mkdir(parents=True, exist_ok=True)
    for m in MODALITIES:
        (root / "Images" / DATASET[m]).mkdir(parents=True, exist_ok=True)
    positions = _Bags(np.random.default_rng([seed, 1]))
    answers = _Bags(np.random.default_rng([seed, 2]))
    records: dict[str, list[dict]] = {m: [] for m in MODALITIES}
    scenes: dict[str, dict] = {}
    for i in range(n_images):
        m = MODALITIES[i % len(MODALITIES)]
        j = i // len(MODALITIES)
        rng = np.random.default_rng([seed, 0, i])
        types = _sample_types(m, questions_per_image, rng)
        scene = _sample_scene(m, types, size, rng, answers)
        name = f"{DATASET[m]}_{j:05d}.png"
        rel = f"Images/{DATASET[m]}/{name}"
        scene["image"] = rel
        pixels = render(scene, rng, real_frac)
        Image.fromarray(pixels, "RGB").save(root / rel, optimize=False, compress_level=3)
        scenes[rel] = scene
        for t in types:
            qid = f"{DATASET[m]}_{len(records[m]):05d}"
            records[m].append(_make_record(scene, rel, t, qid, rng, positions))
    for m in MODALITIES:
        atomic_write_text(qa_dir / f"{DATASET[m]}.json", json.dumps(records[m], indent=1))
    atomic_write_text(root / SCENES_FILE, json.dumps(scenes, indent=None, sort_keys=True))
    return root


def load_scenes(root: str | Path) -> dict[str, dict]:
    """The per-image generating parameters, keyed by image path relative to the root
    (``"Images/Synth-CT/Synth-CT_00000.png"``)."""
    path = Path(root) / SCENES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a root written by make_benchmark?")
    return json.loads(path.read_text(encoding="utf-8"))


def scene_of(item, scenes: dict[str, dict], root: str | Path) -> dict:
    """The scene of a loaded VQAItem (its image path made relative to ``root``)."""
    rel = Path(item.image_path).resolve().relative_to(Path(root).resolve()).as_posix()
    return scenes[rel]


def ensure_benchmark(bench_dir: str | Path, n_images: int = 1600, seed: int = 0, size: int = 112,
                     **kwargs) -> Path:
    """The benchmark root ``bench_dir/OmniMedVQA``, generated once and then reused.

    A stamp file records the parameters (and the generator version); with other parameters the
    benchmark is regenerated. Generation goes to a temporary sibling folder that is renamed into
    place only when complete, so an interrupted run never leaves a tree that looks finished.
    """
    _check_size(size)
    bench_dir = Path(bench_dir)
    root = bench_dir / "OmniMedVQA"
    params = dict(version=GENERATOR_VERSION, n_images=n_images, seed=seed, size=size,
                  **{k: kwargs[k] for k in sorted(kwargs)})
    if read_stamp(root) == params:
        return root
    bench_dir.mkdir(parents=True, exist_ok=True)
    tmp = bench_dir / f".OmniMedVQA.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        make_benchmark(tmp, n_images=n_images, seed=seed, size=size, **kwargs)
        atomic_write_text(tmp / STAMP_FILE, json.dumps(params, sort_keys=True))
        if root.exists():
            old = bench_dir / f".OmniMedVQA.old-{os.getpid()}-{time.time_ns()}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if read_stamp(root) != params:  # someone else won the race with other parameters
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_stamp(root: str | Path | None) -> dict | None:
    """The parameters a generated benchmark root was made with (n_images, seed, size, ...), or None."""
    if root is None:
        return None
    try:
        return json.loads((Path(root) / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def benchmark_digest(root: str | Path) -> str:
    """A SHA-256 over the QA JSON files, the scenes file and every image (for determinism checks)."""
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != STAMP_FILE)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- rationales

SIGNATURE = {
    "CT": "a cross-section of the body with a bright bone rim and grey soft tissue",
    "MRI": "a brain-shaped oval with grey and white matter contrast",
    "X-Ray": "two dark lung fields beside a bright vertical spine",
    "Ultrasound": "a speckled fan-shaped sector on a black background",
    "Dermoscopy": "a pigmented spot on skin-coloured background",
    "Fundus": "an orange-red disc with vessels and a bright optic disc",
    "Microscopy": "stained cells on a light background",
    "OCT": "a horizontal band of bright retinal layers on a dark background",
}
ANATOMY_CUE = {
    "brain": "a round head with a thick bright skull rim", "chest": "two large dark lungs",
    "abdomen": "a wide body with a brighter liver on the left", "pelvis":
        "two bright round femoral heads", "liver": "uniform grey tissue above a bright curved line",
    "kidney": "an oval organ with a dark rim and bright centre",
    "bladder": "a large black fluid-filled oval", "thyroid": "two grey lobes beside a dark airway",
    "left eye": "the optic disc on the left side", "right eye": "the optic disc on the right side",
    "fovea": "the layers dip in the middle", "optic disc": "the layers are missing in the middle",
    "peripheral retina": "flat layers with no central dip or gap",
}
STYLE_CUE = {
    "bright": "bright round", "dark": "dark round", "mixed": "patchy bright-and-dark",
    "melanoma": "irregular very dark", "nevus": "round brown", "keratosis": "light tan",
    "vascular": "red",
}
SEQUENCE_CUE = {
    "T1-weighted": "white matter is brighter than grey matter and fluid is dark",
    "T2-weighted": "fluid in the ventricles is bright",
    "FLAIR": "white matter is darker than grey matter and fluid is dark",
}
STAIN_CUE = {"H&E": "pink with purple nuclei", "IHC (DAB)": "pale blue with brown staining",
             "Giemsa": "blue-violet", "Masson trichrome": "green with red nuclei"}


def _lesion_phrase(scene: dict) -> str:
    return f"{STYLE_CUE[scene['style']]} lesion"


def rationale(item, scene: dict) -> str:
    """A short chain of thought (1-3 sentences) from a scene's parameters: the visible evidence,
    then the conclusion for this item's question. Raises ValueError if the scene's answer is
    not the item's answer (a wrong scene)."""
    m, qt = scene["modality"], item.question_type
    ans = answer_for(scene, qt)
    if ans.casefold() != item.answer_text.casefold():
        raise ValueError(f"scene {scene.get('image')} gives {ans!r} for {item.question_id}, "
                         f"but the item's answer is {item.answer_text!r}")
    if qt == MR:
        return f"The image shows {SIGNATURE[m]}. This is {ans}."
    if qt == AI:
        if SPECS[m]["ai"] == "anatomy":
            return f"The image shows {ANATOMY_CUE[ans]}. So the region is the {ans}."
        quad = scene["lesions"][0]["quadrant"]
        return f"A {_lesion_phrase(scene)} lies in the {quad} part of the image. " \
               f"So it is in the {ans}."
    if qt == DD:
        if not scene["lesions"]:
            return f"The image shows {SIGNATURE[m]} and no focal lesion. So the answer is {ans}."
        return f"There is a {_lesion_phrase(scene)} in the {scene['lesions'][0]['quadrant']} " \
               f"part of the image. A {_lesion_phrase(scene)} here means {ans}."
    if qt == LG:
        les = scene["lesions"][0]
        pct = round(200 * les["r"])
        return f"The {_lesion_phrase(scene)} is {GRADE_WORD[scene['grade'] - 1]}, about {pct}% " \
               f"of the image width. So the grade is {ans}."
    if qt == OBA:
        kind = SPECS[m]["oba"]
        if kind == "count":
            n = scene["count"]
            where = ", ".join(les["quadrant"] for les in scene["lesions"])
            noun = "lesion" if n == 1 else "lesions"
            return f"I see {n} separate {STYLE_CUE[scene['style']]} {noun} ({where}). " \
                   f"So the count is {ans}."
        if kind == "sequence":
            return f"In this MR image {SEQUENCE_CUE[ans]}. So the sequence is {ans}."
        return f"The specimen is {STAIN_CUE[ans]}. So the stain is {ans}."
    raise ValueError(f"unknown question type {qt!r}")


# ----------------------------------------------------------------------------- text-only check

def chance_level(items: Sequence) -> float:
    """Expected accuracy of guessing uniformly among each item's options."""
    return float(np.mean([1.0 / len(it.options) for it in items]))


def _option_features(it, i: int) -> list[str]:
    q = it.question.lower().replace("?", "").split()
    o = it.options[i].lower().split()
    feats = [f"q:{w}" for w in q] + [f"o:{w}" for w in o] + [f"opt:{it.options[i].lower()}"]
    feats += [f"qo:{a}|{b}" for a in q for b in o]
    feats += [f"pos:{i}", f"pos:{i}/{len(it.options)}", f"len:{min(len(it.options[i]) // 4, 8)}"]
    feats += [f"qpos:{w}|{i}" for w in q]
    return feats


def text_only_baseline(train_items: Sequence, test_items: Sequence, *, C: float = 1.0) -> float:
    """Test accuracy of a classifier that sees only the question and option texts.

    Each option is a bag of words of the question, the option, their cross products, the
    option's position and length; a logistic regression scores options (correct vs not) and
    the best-scoring option is the prediction. Near :func:`chance_level` means the text alone
    gives the answer away nowhere.
    """
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression

    if not train_items or not test_items:
        raise ValueError("text_only_baseline needs non-empty train and test items")
    hasher = FeatureHasher(n_features=2 ** 18, input_type="string")

    def rows(items):
        feats, labels, owner = [], [], []
        for k, it in enumerate(items):
            for i in range(len(it.options)):
                feats.append(_option_features(it, i))
                labels.append(int(LETTERS[i] == it.answer))
                owner.append(k)
        return hasher.transform(feats), np.array(labels), np.array(owner)

    Xtr, ytr, _ = rows(train_items)
    clf = LogisticRegression(C=C, max_iter=2000)
    clf.fit(Xtr, ytr)
    Xte, _, owner = rows(test_items)
    score = clf.decision_function(Xte)
    correct, start = 0, 0
    for k, it in enumerate(test_items):
        n = len(it.options)
        pred = int(np.argmax(score[start:start + n]))
        correct += LETTERS[pred] == it.answer
        start += n
    return correct / len(test_items)


# ----------------------------------------------------------------------------- notebook helpers

def sample_grid(items: Sequence, per_modality: int = 6, size: int | None = None, seed: int = 0):
    """A matplotlib figure: one row per modality, ``per_modality`` images each (distinct images,
    picked with ``seed``), titled with the answer of one of their questions."""
    import matplotlib.pyplot as plt

    from . import data

    rng = np.random.default_rng(seed)
    by_mod: dict[str, dict] = {}
    for it in items:
        by_mod.setdefault(it.modality, {}).setdefault(str(it.image_path), it)
    mods = [m for m in MODALITIES if m in by_mod]
    if not mods:
        raise ValueError("sample_grid: no items")
    fig, axes = plt.subplots(len(mods), per_modality, figsize=(1.6 * per_modality, 1.75 * len(mods)),
                             squeeze=False)
    for r, m in enumerate(mods):
        imgs = list(by_mod[m].values())
        pick = [imgs[i] for i in sorted(rng.permutation(len(imgs))[:per_modality])]
        for c in range(per_modality):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(pick):
                x = data.load_image(pick[c].image_path, size)
                ax.imshow(x.permute(1, 2, 0).numpy())
                ax.set_title(pick[c].answer_text[:22], fontsize=7)
        axes[r, 0].text(-0.08, 0.5, m, transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=9)
    fig.tight_layout()
    return fig


def split_table(train: Sequence, test: Sequence):
    """Images and questions per modality in each split (a pandas DataFrame with a total row)."""
    import pandas as pd

    rows = []
    for m in MODALITIES:
        tr = [i for i in train if i.modality == m]
        te = [i for i in test if i.modality == m]
        rows.append(dict(modality=m, train_images=len({str(i.image_path) for i in tr}),
                         test_images=len({str(i.image_path) for i in te}),
                         train_questions=len(tr), test_questions=len(te)))
    df = pd.DataFrame(rows).set_index("modality")
    df.loc["total"] = df.sum()
    return df

"""The benchmark's questions: answer spaces, scene sampling and question records.

Every image is drawn from a small set of generating parameters (a *scene*): modality, anatomy,
finding, lesion size grade, lesion quadrant, lesion count and a global attribute (MRI sequence,
microscopy stain); every answer is read off those parameters (:func:`answer_for`).

Anti-shortcut design: for each question the answer is uniform over its answer space (the question
types of an image are chosen first, then the scene is sampled so that no answer is favoured),
distractors come from the same space, and option positions are balanced.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

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

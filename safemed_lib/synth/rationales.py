"""Rationales: a short chain of thought for a benchmark item, written from its image's scene."""
from __future__ import annotations

from .scenes import AI, DD, GRADE_WORD, LG, MR, OBA, SPECS, answer_for

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

"""The embedded offline benchmark: synthetic medical-looking images with VQA in OmniMedVQA's format.

Every image is drawn from a small set of generating parameters (a *scene*): modality, anatomy,
finding, lesion size grade, lesion quadrant, lesion count and a global attribute (MRI sequence,
microscopy stain). Every answer is read off those parameters, and every parameter is carried by a
coarse visual cue (a whole-image layout, a region's intensity or colour, a blob's size bin or
quadrant, 1-4 large blobs), so that a tiny Qwen2-VL (16 merged image tokens at 112 px) can learn
it. Each modality has its own look, and a share of images takes its fine texture from real
medical images that ship inside installed packages (see :mod:`.drawing`).

Anti-shortcut design: for each question the answer is uniform over its answer space (the question
types of an image are chosen first, then the scene is sampled so that no answer is favoured),
distractors come from the same space, and option positions are balanced, so a model that reads only
the text is at chance (see :func:`safemed_lib.baselines.text_only_baseline`).

- :mod:`.scenes`: answer spaces, scene sampling, question records;
- :mod:`.drawing`: a scene drawn as an image (modality looks, lesions, real textures);
- :mod:`.benchmark`: the benchmark on disk (:func:`make_benchmark`, :func:`ensure_benchmark`,
  :func:`load_scenes`, :func:`scene_of`, :func:`read_stamp`, :func:`benchmark_digest`);
- :mod:`.rationales`: a chain of thought from a scene (:func:`rationale`).
"""
from .benchmark import (GENERATOR_VERSION, GRID, SCENES_FILE, STAMP_FILE, benchmark_digest,
                        ensure_benchmark, load_scenes, make_benchmark, read_stamp, scene_of)
from .drawing import (DERM_COLOURS, FUNDUS_MIXED, LESION_TONES, REAL_SOURCES, STAINS, Canvas,
                      real_sources_available, render)
from .rationales import ANATOMY_CUE, SEQUENCE_CUE, SIGNATURE, STAIN_CUE, STYLE_CUE, rationale
from .scenes import (AI, AI_TEMPLATES, COUNT_WORDS, DATASET, DD, GENERIC_GRADES, GRADE_RADIUS,
                     GRADE_WORD, LETTERS, LG, MODALITIES, MODALITY_OPTION, MODALITY_TYPE, MR,
                     N_OPTIONS_P, OBA, OBA_TEMPLATES, QUADRANT_CENTRE, QUADRANTS, QUESTION_TYPES,
                     SPECS, TEMPLATES, TYPE_WEIGHT, answer_for, answer_space, needs_lesion)

__all__ = [
    "GENERATOR_VERSION", "GRID", "SCENES_FILE", "STAMP_FILE", "make_benchmark", "ensure_benchmark",
    "load_scenes", "scene_of", "read_stamp", "benchmark_digest",
    "Canvas", "LESION_TONES", "FUNDUS_MIXED", "STAINS", "DERM_COLOURS", "REAL_SOURCES",
    "real_sources_available", "render",
    "SIGNATURE", "ANATOMY_CUE", "STYLE_CUE", "SEQUENCE_CUE", "STAIN_CUE", "rationale",
    "LETTERS", "MODALITIES", "QUESTION_TYPES", "MR", "AI", "DD", "LG", "OBA", "MODALITY_TYPE",
    "DATASET", "MODALITY_OPTION", "QUADRANTS", "QUADRANT_CENTRE", "GRADE_RADIUS", "GRADE_WORD",
    "COUNT_WORDS", "GENERIC_GRADES", "SPECS", "TEMPLATES", "AI_TEMPLATES", "OBA_TEMPLATES",
    "N_OPTIONS_P", "TYPE_WEIGHT", "answer_space", "needs_lesion", "answer_for",
]

"""Medical VQA data: the VQAItem record, OmniMedVQA and Med-R1 loaders, images, per-image splits."""
from .cache import cached_image_path, default_cache_dir, open_cached
from .images import from_pil, load_image, load_images, to_pil
from .items import (CHECK_IMAGES, LETTERS, MODALITIES, OMNIMEDVQA_MODALITY, QUESTION_TYPES,
                    UNKNOWN_MODALITY, DataError, DataWarning, LoadResult, Skipped, VQAItem)
from .medr1 import load_medr1_split, parse_medr1_problem
from .omnimedvqa import load_omnimedvqa
from .splits import (assert_no_leakage, counts, cross_splits, leakage_report, split_by_image,
                     split_table, to_frame)

__all__ = [
    "CHECK_IMAGES", "LETTERS", "MODALITIES", "OMNIMEDVQA_MODALITY", "QUESTION_TYPES",
    "UNKNOWN_MODALITY", "DataError", "DataWarning", "LoadResult", "Skipped", "VQAItem",
    "load_omnimedvqa", "load_medr1_split", "parse_medr1_problem", "load_image", "load_images", "to_pil", "from_pil",
    "cached_image_path", "default_cache_dir", "open_cached",
    "split_by_image", "cross_splits", "leakage_report", "assert_no_leakage", "counts", "to_frame",
    "split_table",
]

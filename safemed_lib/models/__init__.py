"""Qwen2-VL / Qwen2.5-VL behind one small wrapper: build, load, save, preprocess, score, generate."""
from .loading import load_vlm
from .precision import autocast, master_weights
from .processor import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, VIDEO_TOKEN, image_only_processor
from .tiny import QWEN2_SPLIT_REGEX, build_tiny_vlm
from .option_scorer import OptionScorer
from .vlm import ARCHS, PROMPT_CACHE_SIZE, SETTINGS_FILE, VLM, ImageEmbeds, vision_tower

# PROMPT_CACHE_SIZE is read in safemed_lib.models.vlm: set or patch it there, not here.
__all__ = ["ARCHS", "CHAT_TEMPLATE", "IMAGE_TOKEN", "PROMPT_CACHE_SIZE", "QWEN2_SPLIT_REGEX", "SETTINGS_FILE",
           "SPECIAL_TOKENS", "VIDEO_TOKEN", "VLM", "ImageEmbeds", "autocast", "build_tiny_vlm", "image_only_processor",
           "OptionScorer", "load_vlm", "master_weights", "vision_tower"]

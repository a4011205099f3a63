"""The image-only Qwen2-VL processor, built explicitly, with Qwen2-VL's special tokens and chat template.

transformers 5.x trap (STACK_NOTES.md): the default Qwen2-VL image and video processors need
torchvision, which must not be installed here, and ``AutoProcessor`` can silently return just the
tokenizer. So the processor is always built explicitly: ``Qwen2VLImageOnlyProcessor`` (an
image-only ``Qwen2VLProcessor``) around ``Qwen2VLImageProcessorPil``.
"""
from __future__ import annotations

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"

# The official Qwen2-VL chat template, trimmed: no videos, no vision ids; default system prompt kept.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _processor_class():
    """``Qwen2VLImageOnlyProcessor``: Qwen2VLProcessor without the torchvision-bound video processor."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


_PROCESSOR_CLASS = None


def image_only_processor(image_processor, tokenizer, chat_template: str | None):
    """Build the image-only processor (the class is created once, on first use)."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        _PROCESSOR_CLASS = _processor_class()
    return _PROCESSOR_CLASS(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

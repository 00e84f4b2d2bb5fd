"""Training data: synthetic captioned shapes, the tiny CLIP-format tokenizer, caption
datasets with a resumable loader, and the pixel analysis that scores generated images.

Submodules import lazily-heavy libraries (`tokenizers`) only where needed; import
`sdjax.data.tokenizer` explicitly for the tokenizer.
"""

from sdjax.data.analysis import (analyze, evaluate, evaluation_prompts, family_prompts, format_report, parse_caption,
                                 parse_prompt, score)
from sdjax.data.datasets import (CaptionLoader, DatasetError, ImageCaptionFolder, JsonlCaptions, SyntheticCaptions,
                                 open_dataset, preprocess, write_synthetic_folder)
from sdjax.data.synthetic import (DEFAULT_CONFIG, PALETTE, POSITIONS, SHAPES, SIZES, SyntheticConfig,
                                  SyntheticShapes, caption_for, caption_vocabulary, default_heldout, render,
                                  sample)

__all__ = [
    "analyze", "evaluate", "evaluation_prompts", "family_prompts", "format_report", "parse_caption", "parse_prompt",
    "score",
    "CaptionLoader", "DatasetError", "ImageCaptionFolder", "JsonlCaptions", "SyntheticCaptions", "open_dataset",
    "preprocess", "write_synthetic_folder",
    "DEFAULT_CONFIG", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "SyntheticConfig", "SyntheticShapes",
    "caption_for", "caption_vocabulary", "default_heldout", "render", "sample",
]

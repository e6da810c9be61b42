"""Captions longer than the text encoder reads, counted once before training so that the cut is never silent.

A standalone model's tokenizer has a fixed window (CLIP: 77 tokens with the start and end tokens) and cuts every
caption there. In the WebUI, captions go through its own text-encoder wrapper, which splits a long prompt into
75-token chunks as generation does, so nothing is cut and nothing is counted.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def warn_long_captions(model, dataset) -> int:
    """Logs one warning with the number of images whose caption the model's tokenizer cuts; returns that number."""
    tokenizer = getattr(model, "tokenizer", None)
    window = getattr(tokenizer, "model_max_length", None)
    captions = [sample.caption for sample in dataset.samples]
    if tokenizer is None or not window or not captions:
        return 0
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False).input_ids]
    cut = [sample.path.name for sample, length in zip(dataset.samples, lengths) if length > window]
    if cut:
        logger.warning("%d of %d images have captions longer than the text encoder's %d tokens (e.g. %s); the "
                       "words past that are not trained on: shorten those captions, or drop the least useful tags",
                       len(cut), len(captions), window - 2, cut[0])
    return len(cut)

"""Stand-in for the SDXL text-encoder wrappers of modules/sd_hijack_clip.py and sd_hijack_open_clip.py.

Kept from A1111 1.10.1: the hijack puts a wrapper in `conditioner.embedders[i]` with the sgm embedder under
`.wrapped` (so the Lora extension names its layers `0_transformer_...` and `1_model_...`); the wrapper copies
`is_trainable`, `input_key` and `return_pooled` from it once, and has `legacy_ucg_val = None`; the CLIP ViT-L
wrapper takes the hidden state `wrapped.layer_idx`, or `-CLIP_stop_at_last_layers` with `opts.sdxl_clip_l_skip`.
Not reproduced: 75-token chunks, emphasis, textual-inversion embeddings (prompts here are short and plain).
"""

import torch

from modules.shared import opts


class FrozenCLIPEmbedderWithCustomWordsBase(torch.nn.Module):
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, 'is_trainable', False)
        self.input_key = getattr(wrapped, 'input_key', 'txt')
        self.return_pooled = getattr(wrapped, 'return_pooled', False)
        self.legacy_ucg_val = None

    def forward(self, texts):
        return self.wrapped(list(texts))


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    def forward(self, texts):
        tokens = self.wrapped.tokenizer(list(texts), truncation=True, max_length=77, padding="max_length",
                                        return_tensors="pt").input_ids
        transformer = self.wrapped.transformer
        device = transformer.text_model.embeddings.token_embedding.weight.device
        outputs = transformer(input_ids=tokens.to(device), output_hidden_states=True)
        if opts.sdxl_clip_l_skip is True:
            return outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
        return outputs.hidden_states[self.wrapped.layer_idx]


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    """The wrapped embedder returns (penultimate hidden state, pooled), as the WebUI's wrapper does."""

"""fmkeras layers: Keras 3 layers written with `keras.ops`."""

from fmkeras.layers.dropout import Dropout
from fmkeras.layers.layer_normalization import LayerNormalization
from fmkeras.layers.masked_lm_head import MaskedLMHead
from fmkeras.layers.multi_head_attention import MultiHeadAttention
from fmkeras.layers.text_embedding import TextEmbedding
from fmkeras.layers.transformer_decoder_block import TransformerDecoderBlock
from fmkeras.layers.transformer_encoder_block import TransformerEncoderBlock

__all__ = [
    "Dropout",
    "LayerNormalization",
    "MaskedLMHead",
    "MultiHeadAttention",
    "TextEmbedding",
    "TransformerDecoderBlock",
    "TransformerEncoderBlock",
]

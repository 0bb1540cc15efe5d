"""The shared block library: one implementation of each idea, used by every model."""
from visionformers.nn.attention import (
    Attention,
    DifferentialAttention,
    KVCache,
    LinearAttention,
    attend,
    attend_math,
    causal_mask,
    sliding_window_mask,
)
from visionformers.nn.blocks import LayerScale, TransformerBlock
from visionformers.nn.drop import DropPath, drop_path
from visionformers.nn.embed import PatchEmbed, to_2tuple
from visionformers.nn.mlp import Mlp
from visionformers.nn.norm import AdaLNModulation, RMSNorm, make_norm, modulate
from visionformers.nn.positional import (
    LearnedPositionEmbedding,
    LearnedPositionEmbedding2D,
    SinusoidalPositionEmbedding,
    resample_pos_embed,
    sincos_1d,
    sincos_2d,
)
from visionformers.nn.relative import T5RelativeBias, WindowRelativeBias, alibi_bias, alibi_slopes, t5_relative_position_bucket
from visionformers.nn.relative_global import RelativeGlobalAttention, relative_logits, skew
from visionformers.nn.rope import RotaryEmbedding, RotaryEmbedding2D, apply_rotary
from visionformers.nn.timestep import FourierFeatures, TimestepEmbedding, timestep_embedding

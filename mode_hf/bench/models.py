"""Configs of the bundled benchmark models (and of the tiny random models the tests build from them): small
Qwen3-VL-MoEs whose vocabulary is the character tokenizer of `bench.processor`.
"""

from __future__ import annotations

from transformers import Qwen3VLMoeConfig

from .processor import MERGE, PATCH, QWEN3_VL_SPECIALS, TEMPORAL_PATCH, special_token_ids, vocab_size

PAD_ID, EOS_ID = 1, 0


def qwen3_vl_moe_config(
    num_layers: int = 2, num_experts: int = 8, hidden: int = 64, moe_intermediate: int = 32, vision_hidden: int = 32,
    vision_depth: int = 2, top_k: int = 2,
) -> Qwen3VLMoeConfig:
    """A Qwen3-VL-MoE config small enough for CPU (about 0.2M parameters with the defaults): 4 attention heads of
    hidden / 4, a vision tower of `vision_depth` blocks with patch 8 and merge 2, one deepstack level.

    The interleaved MRoPE sections sum to head_dim / 2 as vLLM requires (transformers reads only the last two), and
    `norm_topk_prob` is written for engines that read it (transformers' router always renormalises)."""
    head_dim = hidden // 4
    text = dict(
        vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=moe_intermediate,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        num_experts=num_experts, num_experts_per_tok=top_k, decoder_sparse_step=1, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 2 - 6, 3, 3], "mrope_interleaved": True},
        tie_word_embeddings=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID, norm_topk_prob=True,
    )
    vision = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2, in_channels=3,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, out_hidden_size=hidden,
        num_position_embeddings=144, deepstack_visual_indexes=[0],
    )
    ids = special_token_ids(QWEN3_VL_SPECIALS)
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"], tie_word_embeddings=False,
    )

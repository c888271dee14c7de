"""Mask2Former's parts (Cheng et al., CVPR 2022), as the segmentation recipes compose them.

    ms_deform_attn, MSDeformAttn       multi-scale deformable attention (deform.py)
    MSDeformAttnPixelDecoder           6-layer deformable encoder + FPN to stride 4 (pixel_decoder.py)
    MaskedAttentionDecoder             masked-attention transformer decoder, deep supervision (decoder.py)
    set_loss, semantic_targets         Hungarian-matched set loss with importance-sampled points, no host sync (criterion.py)
    semantic_scores                    per-class scores from (class, mask) predictions

    mask_features, memories = pixel_decoder(features)             # 4 maps, strides 4..32
    all_cls, all_masks = decoder(mask_features, memories, q, q_pos)
    loss = set_loss(all_cls, all_masks, *semantic_targets(labels, num_classes))
    scores = semantic_scores(all_cls[-1], all_masks[-1], (H, W))  # [B, K, H, W]
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .criterion import SetLossConfig, check_class_ids, point_sample, semantic_targets, set_loss, uncertain_points
from .decoder import MaskedAttentionDecoder
from .deform import MSDeformAttn, ms_deform_attn
from .pixel_decoder import MSDeformAttnPixelDecoder, sine_position_embedding


def semantic_scores(cls: Tensor, masks: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
    """Mask2Former semantic inference: Σ_q softmax(c_q)[:K] · σ(M_q): cls [B, Q, K+1], masks
    [B, Q, h, w] -> [B, K, h, w] (float32). With `size` the mask LOGITS are first resized to it
    (bilinear), as mmseg's `Mask2FormerHead.predict` does before the sigmoid: -> [B, K, *size]."""
    masks = masks.float()
    if size is not None:
        masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.einsum("bqk,bqhw->bkhw", cls.float().softmax(-1)[..., :-1], masks.sigmoid())


__all__ = [
    "MSDeformAttn", "MSDeformAttnPixelDecoder", "MaskedAttentionDecoder", "SetLossConfig", "check_class_ids", "ms_deform_attn", "point_sample",
    "semantic_scores", "semantic_targets", "set_loss", "sine_position_embedding", "uncertain_points",
]  # fmt: skip

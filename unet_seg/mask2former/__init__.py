"""Mask2Former's parts (Cheng et al., CVPR 2022), as the segmentation recipes compose them.

    ms_deform_attn, MSDeformAttn       multi-scale deformable attention (deform.py)
"""

from .deform import MSDeformAttn, ms_deform_attn

__all__ = ["MSDeformAttn", "ms_deform_attn"]

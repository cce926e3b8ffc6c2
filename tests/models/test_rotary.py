"""Rotary: which frequency pairs rotate (the K = V verify kernel rebuilds only those dims of a key)."""

from __future__ import annotations

import pytest
import torch

from etspec.models.config import RopeConfig
from etspec.models.layers import Rotary, rope_inv_freq


@pytest.mark.parametrize(
    "rope,head_dim",
    [
        (RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25), 512),
        (RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.1), 64),
        (RopeConfig(theta=1e4), 128),
        (RopeConfig(theta=5e5, rope_type="linear", factor=8.0), 64),
    ],
)
def test_rotated_freqs_are_the_nonzero_prefix(rope, head_dim):
    inv = rope_inv_freq(rope, head_dim)
    rot = Rotary(rope, head_dim)
    r = rot.rotated_pairs
    assert torch.equal(rot.rotated_freqs(), inv[:r])
    assert bool((inv[:r] > 0).all()) and not bool(inv[r:].any())

"""The engine's logits equal transformers' own forward pass (fp32 tolerance), for
every supported family, in both kernel modes, with sequences packed into one pass."""

from __future__ import annotations

import pytest
import torch

from local_backend.engine import Engine
from tests.local.conftest import DEVICE

SEQUENCES = [[5, 9, 33, 2, 100, 7, 8], [3, 17, 17, 64, 90, 11, 1, 120, 45, 6, 77, 30, 44]]


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["default", "batch-invariant"])
def test_logits_match_transformers(model_dirs, reference, family, kernels):
    engine = Engine.load(model_dirs[family], kernels=kernels, device=DEVICE, max_slots=4, max_len=64)
    model = reference(model_dirs[family])
    ours = engine.forward_logits(SEQUENCES)  # both sequences in one packed forward pass
    for ids, logits in zip(SEQUENCES, ours):
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].float()
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_changes_the_frequencies(model_dirs):
    """The llama3 family above would pass with unscaled RoPE only if scaling did nothing."""
    scaled = Engine.load(model_dirs["llama3-rope"], kernels="default", device=DEVICE, max_len=64).config.rope
    inv = scaled.inv_freq(16)
    plain = type(scaled)(theta=scaled.theta).inv_freq(16)
    assert not torch.equal(inv, plain)
    assert bool((inv <= plain).all())  # scaling only slows the rotation
    torch.testing.assert_close(inv[-1], plain[-1] / 8.0)  # long wavelengths: divided by factor

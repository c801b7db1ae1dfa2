"""PAM (METHOD.md section 1): relu, then zero every activation below alpha x the channel's spatial max."""

import pytest
import torch

from bestie.models.pam import PAM


def test_pam_zeroes_exactly_below_alpha_times_channel_max():
    # channel 0: max 10 -> threshold 7; channel 1: max 2 -> threshold 1.4 (negatives -> 0 by the relu)
    x = torch.tensor(
        [[[[10.0, 7.0, 6.99], [-3.0, 8.0, 0.5]],
          [[2.0, 1.4, 1.39], [-5.0, 1.5, 0.0]]]]
    )
    expected = torch.tensor(
        [[[[10.0, 7.0, 0.0], [0.0, 8.0, 0.0]],
          [[2.0, 1.4, 0.0], [0.0, 1.5, 0.0]]]]
    )
    out = PAM(alpha=0.7)(x)
    assert torch.equal(out, expected)


def test_pam_per_sample_and_channel_max_and_all_negative_channel():
    x = torch.tensor([[[[1.0, 0.5]], [[-1.0, -2.0]]], [[[4.0, 3.0]], [[0.2, 0.1]]]])  # (2, 2, 1, 2)
    out = PAM(alpha=0.6)(x)
    # sample 0: ch0 max 1 -> keep >= 0.6; ch1 all negative -> zeros
    # sample 1: ch0 max 4 -> keep >= 2.4; ch1 max 0.2 -> keep >= 0.12
    assert torch.equal(out, torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]], [[[4.0, 3.0]], [[0.2, 0.0]]]]))


def test_pam_alpha_zero_is_relu_and_gradient_flows_through_kept_only():
    x = torch.tensor([[[[3.0, -1.0, 1.0, 2.5]]]], requires_grad=True)
    assert torch.equal(PAM(alpha=0.0)(x), torch.relu(x))
    PAM(alpha=0.7)(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]]))


def test_pam_rejects_bad_alpha_and_shape():
    with pytest.raises(ValueError):
        PAM(alpha=1.5)
    with pytest.raises(ValueError):
        PAM()(torch.zeros(3, 4))

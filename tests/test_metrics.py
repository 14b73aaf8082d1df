import math

import numpy as np
import pytest
import torch

from mmaccel.runtime.metrics import psnr, relative_l2


def test_psnr_values():
    ref = torch.zeros(4, 4)
    assert psnr(ref, ref, data_range=1.0) == math.inf
    assert math.isclose(psnr(ref + 0.1, ref, data_range=1.0), 20.0, abs_tol=1e-5)  # mse 0.01
    ref = torch.tensor([0.0, 2.0])
    assert math.isclose(psnr(ref + 0.2, ref), 20.0, abs_tol=1e-5)  # peak-to-peak 2, mse 0.04
    assert math.isclose(psnr(np.full((2, 2), 0.5), np.zeros((2, 2)) + 0.4, data_range=1.0), 20.0, abs_tol=1e-5)


def test_psnr_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(2), torch.zeros(3), data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.ones(2), torch.ones(2) * 0.5)  # constant reference, no range given


def test_relative_l2():
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2(ref, ref) == 0.0
    assert math.isclose(relative_l2(ref + torch.tensor([0.3, 0.4]), ref), 0.1, abs_tol=1e-7)

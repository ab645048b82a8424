import math

import pytest
import torch

from diffquant.metrics import condition_accuracy, frechet_distance, psnr, sqnr_db, ssim
from diffquant.models.classifier import DigitClassifier


def images(seed, n=200):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return DigitClassifier().eval()


def test_fd_zero_for_identical_sets_and_positive_for_shifted(classifier):
    a = images(0)
    assert frechet_distance(classifier, a, a) == pytest.approx(0.0, abs=1e-3)
    shifted = (a * 0.3 + 0.5).clamp(-1, 1)
    assert frechet_distance(classifier, a, shifted) > 0.05


def test_fd_deterministic_and_matches_closed_form(classifier):
    import numpy as np
    from scipy import linalg

    a, b = images(1), images(2)
    assert frechet_distance(classifier, a, b) == frechet_distance(classifier, a, b)
    with torch.no_grad():
        fa, fb = classifier.features(a).double().numpy(), classifier.features(b).double().numpy()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    oracle = float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))
    assert frechet_distance(classifier, a, b) == pytest.approx(oracle, rel=1e-3, abs=1e-5)


def test_condition_accuracy_oracle():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long(), 10).float()

    x = torch.tensor([0, 1, 2, 3], dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 1, 8, 8)
    assert condition_accuracy(Fixed(), x, torch.tensor([0, 1, 5, 3])) == 0.75


def test_psnr_ssim_sqnr():
    a = images(3)
    assert psnr(a, a) == math.inf
    noisy = a + 0.01 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4))
    mse = float((noisy - a).pow(2).mean())
    assert psnr(a, noisy) == pytest.approx(10 * math.log10(4 / mse), rel=1e-3)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert ssim(a, noisy) < 1.0
    assert sqnr_db(a, a) == math.inf
    assert sqnr_db(a, noisy) == pytest.approx(
        10 * math.log10(float(a.pow(2).sum() / (noisy - a).pow(2).sum())), rel=1e-6
    )

"""Range observers: exact max, percentile and MSE search from a streamed histogram."""

import pytest
import torch

from stepquant.calibrators import RangeObserver
from stepquant.quant import IntGrid
from stepquant.quant.functional import FakeQuantize

GRID = IntGrid(8, narrow=False)


def test_max_is_exact_over_batches_with_growing_range():
    observer = RangeObserver("layer")
    observer.update(torch.tensor([0.1, -0.2]))
    observer.update(torch.tensor([3.0, -7.5]))
    observer.update(torch.tensor([1.0]))
    assert observer.amax("max", GRID) == 7.5
    assert observer.counts.sum() == 5  # histogram growth keeps every count


def test_percentile_of_a_known_distribution():
    observer = RangeObserver("layer")
    values = torch.arange(1, 10001, dtype=torch.float32)
    for chunk in values.split(1000):
        observer.update(chunk)
    assert observer.amax("percentile", GRID, percentile=99.0) == pytest.approx(9900, rel=2e-3)
    assert observer.amax("percentile", GRID, percentile=100.0) == 10000


def _quantization_error(x: torch.Tensor, amax: float) -> float:
    scale = torch.tensor(amax / GRID.qmax)
    return float((FakeQuantize.apply(x, scale, GRID) - x).square().sum())


def test_mse_clips_a_heavy_tail_and_lowers_the_error():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((200_000,))
    observer = RangeObserver("layer")
    for chunk in x.split(50_000):
        observer.update(chunk)
    amax = observer.amax("mse", GRID)
    assert amax < 0.9 * observer.max
    assert _quantization_error(x, amax) < 0.9 * _quantization_error(x, observer.max)


def test_nan_is_refused_with_the_layer_name():
    observer = RangeObserver("down_blocks.0.resnets.0.conv1")
    with pytest.raises(FloatingPointError, match="down_blocks.0.resnets.0.conv1"):
        observer.update(torch.tensor([1.0, float("nan")]))


def test_all_zero_input_reports_zero_range():
    observer = RangeObserver("layer")
    observer.update(torch.zeros(10))
    assert observer.amax("mse", GRID) == 0.0

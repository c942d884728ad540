"""The quantizer core against hand-computed values on TensorRT's integer grid."""

import pytest
import torch
from torch import nn

from stepquant.quant import Fp8Grid, IntGrid, QuantizedLayer, QuantSpec, quantize_
from stepquant.quant.functional import FakeQuantize
from stepquant.quant.layers import ActivationQuantizer, WeightQuantizer


def test_int8_grids_match_tensorrt():
    assert (IntGrid(8, narrow=True).qmin, IntGrid(8, narrow=True).qmax) == (-127, 127)
    assert (IntGrid(8, narrow=False).qmin, IntGrid(8, narrow=False).qmax) == (-128, 127)
    assert (IntGrid(4, narrow=True).qmin, IntGrid(4, narrow=True).qmax) == (-7, 7)
    assert (IntGrid(4, narrow=False).qmin, IntGrid(4, narrow=False).qmax) == (-8, 7)


def test_fake_quantize_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.0, 0.25, 0.75, -0.75, 1.3, 100.0, -100.0])
    # scale 0.5: x/s = 0, 0.5, 1.5, -1.5, 2.6, 200, -200 -> 0, 0, 2, -2, 3, 127, -128
    expected = torch.tensor([0.0, 0.0, 1.0, -1.0, 1.5, 63.5, -64.0])
    assert torch.equal(FakeQuantize.apply(x, torch.tensor(0.5), IntGrid(8, narrow=False)), expected)


def test_activation_quantizer_scale_is_amax_over_qmax():
    quantizer = ActivationQuantizer(IntGrid(8, narrow=False))
    quantizer.set_amax(12.7)
    assert float(quantizer.scale) == pytest.approx(0.1)
    assert torch.allclose(quantizer(torch.tensor([0.26, -13.0, 13.0])), torch.tensor([0.3, -12.8, 12.7]))
    four_bit = ActivationQuantizer(IntGrid(4, narrow=False))
    four_bit.set_amax(7.0)
    assert torch.equal(four_bit(torch.tensor([3.4, 9.0, -9.0])), torch.tensor([3.0, 7.0, -8.0]))


def test_activation_quantizer_refuses_zero_and_nan_ranges():
    with pytest.raises(ValueError, match="zero"):
        ActivationQuantizer(IntGrid(8, narrow=False)).set_amax(0.0)
    with pytest.raises(ValueError, match="not finite"):
        ActivationQuantizer(IntGrid(8, narrow=False)).set_amax(float("nan"))
    with pytest.raises(RuntimeError, match="before calibration"):
        ActivationQuantizer(IntGrid(8, narrow=False))(torch.ones(2))


def test_weight_quantizer_per_output_channel_narrow_range():
    weight = torch.tensor([[1.0, -0.5], [0.0, 0.0], [2.54, 1.27]])
    quantizer = WeightQuantizer(IntGrid(8, narrow=True), weight)
    assert torch.allclose(quantizer.scale, torch.tensor([1 / 127, 1 / 127, 0.02]))
    # -0.5 * 127 = -63.5 -> -64 (half to even); 1.27 / 0.02 = 63.5 -> 64; all-zero channel -> 0
    assert quantizer.qweight.tolist() == [[127, -64], [0, 0], [127, 64]]
    assert quantizer.qweight.dtype == torch.int8
    assert torch.allclose(quantizer(weight), torch.tensor([[1.0, -64 / 127], [0.0, 0.0], [2.54, 1.28]]))


def test_four_bit_weights_stay_on_their_grid():
    weight = torch.randn(4, 3, 3, 3)
    quantizer = WeightQuantizer(IntGrid(4, narrow=True), weight)
    assert quantizer.qweight.abs().max() == 7
    assert torch.equal(quantizer.qweight.abs().flatten(1).amax(1), torch.full((4,), 7, dtype=torch.int8))


def test_quantized_layer_matches_float_layer_on_grid_values():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layer = QuantizedLayer(conv, IntGrid(8, narrow=True), IntGrid(8, narrow=False))
    layer.input_quantizer.set_amax(1.0)
    x = torch.randint(-127, 128, (1, 2, 5, 5)) / 127.0  # exactly on the activation grid
    reference = nn.functional.conv2d(x, layer.weight_quantizer(conv.weight), conv.bias, padding=1)
    assert torch.allclose(layer(x), reference, atol=1e-6)


def test_quantize_applies_default_exclusions():
    from conftest import TINY_UNET
    from diffusers import UNet2DModel

    unet = UNet2DModel(**TINY_UNET)
    names = quantize_(unet, QuantSpec())
    for excluded in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"):
        assert excluded not in names
        assert not isinstance(unet.get_submodule(excluded), QuantizedLayer)
    assert "down_blocks.0.resnets.0.conv1" in names
    assert any(name.endswith("attentions.0.to_q") for name in names)
    custom = quantize_(UNet2DModel(**TINY_UNET), QuantSpec(exclude=(r"attentions",)))
    assert "conv_in" in custom and not any("attentions" in name for name in custom)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_bits": 9}, "between 2 and 8"),
        ({"act_bits": 1}, "between 2 and 8"),
        ({"exclude": ("conv[",)}, "not a valid regular expression"),
    ],
)
def test_spec_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_fp8_grid_rounds_to_e4m3_values_and_saturates_at_448():
    grid = Fp8Grid()
    x = torch.tensor([0.0, 1.0, 1.0625, 1.2, 300.0, 1000.0, -1000.0])
    # E4M3 has 3 mantissa bits: 1.0625 is a tie between 1.0 and 1.125 -> even mantissa 1.0; 1.2 -> 1.25;
    # 300 lies between 288 and 320 (step 32) -> 288; beyond 448 saturates
    assert grid.quantize(x, torch.tensor(1.0)).tolist() == [0.0, 1.0, 1.0, 1.25, 288.0, 448.0, -448.0]
    quantizer = ActivationQuantizer(grid)
    quantizer.set_amax(448.0)
    assert float(quantizer.scale) == 1.0


def test_fp8_weights_are_per_tensor_float8():
    weight = torch.randn(4, 3, 3, 3)
    quantizer = WeightQuantizer(Fp8Grid(), weight, per_channel=False)
    assert quantizer.qweight.dtype == torch.float8_e4m3fn and quantizer.scale.numel() == 1
    assert float(quantizer.scale) == pytest.approx(float(weight.abs().max()) / 448)
    assert torch.allclose(quantizer(weight), weight, rtol=0.07, atol=1e-6)  # 3 mantissa bits: error <= 1/16 relative
    with pytest.raises(ValueError, match="bits must be 8"):
        QuantSpec(4, 8, format="fp8")

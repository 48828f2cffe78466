"""The model zoo: published sizes, the block table, width multipliers, minimalistic variants, ArchSpec JSON."""
import pytest
import torch
from torch import nn

from compress.models.mobilenetv3 import (
    ArchSpec,
    BlockConfig,
    MobileNetV3,
    arch_spec,
    count_params,
    make_divisible,
    mobilenet_v3_large,
    mobilenet_v3_small,
)


@pytest.mark.parametrize("builder,params", [(mobilenet_v3_large, 5_483_032), (mobilenet_v3_small, 2_542_856)])
def test_published_parameter_counts(builder, params):
    assert count_params(builder()) == params


def test_make_divisible_matches_mobilenet_rule():
    assert make_divisible(18) == 24  # 16 would lose more than 10 %
    assert make_divisible(16 * 0.75) == 16
    assert make_divisible(72 * 0.75) == 56
    assert make_divisible(3) == 8


def test_width_mult_075_channels():
    spec = arch_spec("mobilenet_v3_large", width_mult=0.75)
    assert spec.blocks[0].in_ch == 16 and spec.blocks[-1].out_ch == 120
    assert spec.last_conv == 720 and spec.last_channel == 960
    assert all(b.in_ch % 8 == 0 and b.expanded % 8 == 0 and b.out_ch % 8 == 0 for b in spec.blocks)


def test_minimalistic_has_no_se_no_hswish_and_3x3_only():
    model = mobilenet_v3_small(minimalistic=True, num_classes=10)
    assert not any(isinstance(m, nn.Hardswish) for m in model.modules())
    assert not any(isinstance(m, nn.Hardsigmoid) for m in model.modules())
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(3, 3), (1, 1)}
    assert all(b.se_channels == 0 and b.act == "RE" for b in model.spec.blocks)


@pytest.mark.parametrize("size", [32, 57, 224])
def test_any_input_size_and_num_classes(size):
    model = mobilenet_v3_small(width_mult=0.75, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_residual_only_where_shapes_allow():
    spec = arch_spec("mobilenet_v3_large")
    model = MobileNetV3(spec)
    for block, cfg in zip(list(model.features)[1:-1], spec.blocks):
        assert block.use_res_connect == (cfg.stride == 1 and cfg.in_ch == cfg.out_ch)
    assert sum(b.use_res_connect for b in spec.blocks) == 10


def test_torchvision_key_layout_of_first_blocks():
    keys = list(mobilenet_v3_small().state_dict())
    assert keys[:3] == ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias"]
    assert "features.1.block.1.fc1.weight" in keys  # SE of the first small block (no expansion conv)
    assert "features.4.block.2.fc2.bias" in keys
    assert keys[-4:] == ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"]


def test_archspec_json_round_trip_rebuilds_the_same_network():
    spec = arch_spec("mobilenet_v3_small", width_mult=0.75, num_classes=10)
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec
    a, b = MobileNetV3(spec), MobileNetV3(again)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_archspec_rejects_bad_data():
    with pytest.raises(ValueError, match="chain"):
        ArchSpec("x", (BlockConfig(16, 3, 16, 16, 0, "RE", 1), BlockConfig(24, 3, 48, 24, 0, "RE", 1)), 144, 128)
    with pytest.raises(ValueError, match="act"):
        BlockConfig(16, 3, 16, 16, 0, "GELU", 1)
    with pytest.raises(ValueError, match="unknown ArchSpec fields"):
        ArchSpec.from_dict({**arch_spec().to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown architecture"):
        arch_spec("mobilenet_v2")

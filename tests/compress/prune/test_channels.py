"""Channel pruning: groups (residual / SE consistency), importance, removal that keeps the network's function
where no channel was removed, and the architecture saved as JSON rebuilding the same network."""
import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.models.checkpoint import load_model, save_checkpoint
from compress.models.mobilenetv3 import MobileNetV3, arch_spec, count_params, make_divisible
from compress.prune.channels import (
    channel_groups,
    channel_importance,
    group_by_name,
    keep_indices,
    load_arch,
    prune_channels,
    pruned_spec,
    rebuild,
    save_arch,
    shrink_group,
    structure_problems,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()




@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return _randomize_bn(MobileNetV3(arch_spec("mobilenet_v3_small", num_classes=10)))


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_groups_of_small_follow_residuals_and_couplings():
    spec = arch_spec("mobilenet_v3_small", num_classes=10)
    groups = {g.name: g for g in channel_groups(spec)}
    # stem -> first block: block 0 has no expansion conv, so its depthwise runs on the stem's channels
    assert set(groups["bottleneck:features.0"].slots) == {("stem",), ("exp", 0)}
    # blocks 3..5 (features.4-6) share one residual stream of 40 channels; 9..11 one of 96 feeding the last conv
    assert set(groups["bottleneck:features.4-6"].slots) == {("out", 3), ("out", 4), ("out", 5)}
    assert groups["bottleneck:features.9-11"].channels == 96
    expansions = [g for g in groups.values() if g.kind == "expansion"]
    assert len(expansions) == 10 and all(len(g.slots) == 1 for g in expansions)  # every block but the first
    assert groups["head:features.12"].channels == 576 and groups["hidden:classifier.0"].channels == 1024
    # every channel dimension is in exactly one group, and every group size is a multiple of 8
    slots = [s for g in groups.values() for s in g.slots]
    assert len(slots) == len(set(slots)) == 1 + 2 * len(spec.blocks) + 2
    assert all(g.channels % 8 == 0 for g in groups.values())


def test_large_has_one_group_per_residual_chain():
    spec = arch_spec("mobilenet_v3_large", num_classes=10)
    chains = [g for g in channel_groups(spec) if g.kind == "bottleneck"]
    # stem+block0 (16, residual), 24, 40, 80, 112, 160
    assert [g.channels for g in chains] == [16, 24, 40, 80, 112, 160]
    assert set(chains[0].slots) == {("stem",), ("exp", 0), ("out", 0)}


def test_keeping_every_channel_is_the_identity(small, x):
    keep = {g.name: list(range(g.channels)) for g in channel_groups(small.spec)}
    pruned = prune_channels(small, keep)
    assert pruned.spec == small.spec
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), small(x), rtol=0, atol=0)


def _silence(model: MobileNetV3, block: int, channels: list[int], squeeze: int) -> MobileNetV3:
    """A copy in which the given expanded channels of ``block`` and its first ``squeeze`` SE squeeze channels
    contribute nothing to the output (the squeeze channels also get zero reduce filters: least important)."""
    m = MobileNetV3(model.spec)
    m.load_state_dict(model.state_dict())
    m.eval()
    layers = list(m.features[block + 1].block)
    se, project = layers[-2], layers[-1]
    with torch.no_grad():
        project[0].weight[:, channels] = 0
        se.fc1.weight[:, channels] = 0  # the SE's squeeze does not see them either
        se.fc1.weight[:squeeze] = 0
        se.fc1.bias[:squeeze] = -1.0  # ReLU(-1) = 0: these squeeze channels are always off
        se.fc2.weight[:, :squeeze] = 0
    return m


@pytest.mark.parametrize("block,n_drop", [(3, 16), (4, 8), (8, 64), (9, 16)])
def test_removing_channels_that_contribute_nothing_keeps_the_function(small, x, block, n_drop):
    b = small.spec.blocks[block]
    drop = list(range(0, b.expanded, 3))[:n_drop]  # spread over the width
    group = f"expansion:features.{block + 1}"
    new_se = pruned_spec(small.spec, {group: b.expanded - n_drop}).blocks[block].se_channels
    # SE squeeze follows the block: the paper's 1/4 ratio rounded to 8, never wider than before
    assert new_se == min(b.se_channels, make_divisible((b.expanded - n_drop) // 4, 8))
    silenced = _silence(small, block, drop, b.se_channels - new_se)
    pruned = prune_channels(silenced, {group: [c for c in range(b.expanded) if c not in drop]})
    nb = pruned.spec.blocks[block]
    assert (nb.expanded, nb.se_channels) == (b.expanded - n_drop, new_se)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), silenced(x), rtol=1e-5, atol=1e-5)
    assert count_params(pruned) < count_params(small)


def test_pruning_a_block_leaves_earlier_blocks_unchanged(small, x):
    pruned = shrink_group(small, "expansion:features.7", 64)
    with torch.no_grad():
        a, b = small.features[:7](x), pruned.features[:7](x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_residual_group_slices_every_member_consistently(small, x):
    g = group_by_name(small.spec, "bottleneck:features.4-6")
    keep = keep_indices(channel_importance(small, g, "l2"), 32)
    pruned = prune_channels(small, {g.name: keep})
    spec = pruned.spec
    assert spec.blocks[3].out_ch == spec.blocks[4].in_ch == spec.blocks[4].out_ch == 32
    assert spec.blocks[5].in_ch == spec.blocks[5].out_ch == spec.blocks[6].in_ch == 32
    assert [b.use_res_connect for b in spec.blocks] == [b.use_res_connect for b in small.spec.blocks]
    sd, old = pruned.state_dict(), small.state_dict()
    # the residual stream keeps the same channels in every producer and every consumer
    torch.testing.assert_close(sd["features.4.block.3.0.weight"], old["features.4.block.3.0.weight"][keep])
    torch.testing.assert_close(sd["features.6.block.3.0.weight"], old["features.6.block.3.0.weight"][keep])
    torch.testing.assert_close(sd["features.7.block.0.0.weight"], old["features.7.block.0.0.weight"][:, keep])
    torch.testing.assert_close(sd["features.5.block.0.1.running_var"], old["features.5.block.0.1.running_var"])
    assert pruned(x).shape == (3, 10)


def test_stem_group_prunes_first_block_depthwise_and_se_together(small, x):
    pruned = shrink_group(small, "bottleneck:features.0", 8, importance="bn")
    b0 = pruned.spec.blocks[0]
    assert pruned.spec.stem_channels == b0.in_ch == b0.expanded == 8 and not b0.has_expand
    sd = pruned.state_dict()
    assert sd["features.0.0.weight"].shape[0] == 8 and sd["features.1.block.0.0.weight"].shape[0] == 8
    assert sd["features.1.block.1.fc1.weight"].shape == (8, 8, 1, 1)  # SE 8 -> 8 (already minimal)
    assert sd["features.1.block.1.fc2.weight"].shape == (8, 8, 1, 1)
    assert pruned(x).shape == (3, 10)


def test_head_and_hidden_groups_slice_the_classifier(small, x):
    pruned = shrink_group(shrink_group(small, "head:features.12", 256), "hidden:classifier.0", 512)
    sd = pruned.state_dict()
    assert sd["features.12.0.weight"].shape[0] == 256 and sd["classifier.0.weight"].shape == (512, 256)
    assert sd["classifier.3.weight"].shape == (10, 512)
    assert pruned(x).shape == (3, 10)


def test_structure_never_changes(small):
    spec = small.spec
    # 48 -> 40 would equal block 6's input (40): a residual would appear
    assert structure_problems(spec, pruned_spec(spec, {"bottleneck:features.7-8": 40}))
    with pytest.raises(UserError, match="residual"):
        shrink_group(small, "bottleneck:features.7-8", 40)
    # an expansion equal to the block input would remove the expansion conv
    assert structure_problems(spec, pruned_spec(spec, {"expansion:features.3": 24}))
    with pytest.raises(UserError, match="multiples of 8"):
        shrink_group(small, "expansion:features.3", 60)


@pytest.mark.parametrize("method", ["l1", "l2", "bn"])
def test_importance_ranks_a_zeroed_filter_last(small, method):
    g = group_by_name(small.spec, "expansion:features.5")
    m = MobileNetV3(small.spec)
    m.load_state_dict(small.state_dict())
    with torch.no_grad():
        m.features[5].block[0][0].weight[7] = 0
        m.features[5].block[0][1].weight[7] = 0
    s = channel_importance(m, g, method)
    assert s.shape == (240,) and int(s.argmin()) == 7
    assert 7 not in keep_indices(s, 232).tolist()


def test_rebuilt_from_json_equals_the_pruned_model(small, x, tmp_path):
    pruned = shrink_group(shrink_group(small, "expansion:features.10", 384), "bottleneck:features.9-11", 64)
    save_arch(tmp_path / "arch.json", pruned.spec)
    rebuilt = rebuild(tmp_path / "arch.json", pruned.state_dict()).eval()
    assert load_arch(tmp_path / "arch.json") == pruned.spec
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), rtol=0, atol=0)
    # the checkpoint carries the architecture too: load_model rebuilds the pruned network from data
    save_checkpoint(tmp_path / "m.pt", pruned)
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.spec == pruned.spec
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), pruned(x), rtol=0, atol=0)

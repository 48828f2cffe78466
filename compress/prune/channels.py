"""Structured channel pruning of :class:`~compress.models.mobilenetv3.MobileNetV3`, in three separable parts
(after Torch-Pruning):

1. **Groups** (:func:`channel_groups`): which channels must be removed together.  A network's channel
   dimensions ("slots") are the stem output, each block's expanded width, each block's output, the last conv's
   output and the classifier's hidden width.  A residual block ties its input and output slots; a block
   without an expansion conv (its depthwise runs on its input) ties its expanded slot to its input.  The
   connected slots form one group: an *expansion* group (one block's expanded channels: the expansion conv,
   the depthwise conv, the SE's reduce input / expand output and the projection's input), a *bottleneck*
   group (a chain of blocks sharing a residual stream, including the stem -> first block and the last block ->
   last conv couplings), the *head* (last conv output / classifier input) and the *hidden* classifier width.
2. **Importance** (:func:`channel_importance`): the L1 or L2 norm of each channel's filters in every layer
   that produces the group's channels (normalised per layer by its mean, then summed over the layers), or the
   BatchNorm scale ``|gamma|`` ("bn", network slimming).
3. **Removal** (:func:`prune_channels`): slice every conv / BN / SE / classifier tensor into a new
   ``MobileNetV3(spec')`` whose :class:`ArchSpec` has the smaller counts.  The SE squeeze width follows its
   block: ``make_divisible(expanded / 4, 8)`` (the paper's ratio), never more than before, keeping the
   squeeze channels with the largest reduce filters.

Channel counts stay multiples of 8 (the network's counts already are; :func:`shrink_group` only removes
multiples of 8) and the block structure never changes: a pruning that would make an expansion width equal
to its input (dropping the expansion conv) or a stride-1 block's input equal to its output (adding a
residual) is refused.  A pruned network is saved as data - the ArchSpec JSON plus a state_dict - and rebuilt
with :func:`rebuild`; modules are never pickled.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from compress.errors import UserError
from compress.io import write_text
from compress.models.mobilenetv3 import ArchSpec, BlockConfig, MobileNetV3, make_divisible

__all__ = ["ChannelGroup", "channel_groups", "channel_importance", "prune_channels", "shrink_group",
           "pruned_spec", "structure_problems", "save_arch", "load_arch", "rebuild", "IMPORTANCE", "DIVISOR"]

IMPORTANCE = ("l1", "l2", "bn")
DIVISOR = 8

Slot = tuple  # ("stem",) | ("exp", i) | ("out", i) | ("last",) | ("hidden",)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together; ``slots`` are the channel dimensions tied into one."""

    name: str
    kind: str  # "expansion" | "bottleneck" | "head" | "hidden"
    slots: tuple[Slot, ...]
    channels: int

    @property
    def blocks(self) -> tuple[int, ...]:
        """Indices (into ``spec.blocks``) of the blocks whose expanded or output channels are in the group."""
        return tuple(sorted({s[1] for s in self.slots if s[0] in ("exp", "out")}))


def _input_slot(i: int) -> Slot:
    return ("stem",) if i == 0 else ("out", i - 1)


def _slot_size(spec: ArchSpec, slot: Slot) -> int:
    kind = slot[0]
    if kind == "stem":
        return spec.stem_channels
    if kind == "exp":
        return spec.blocks[slot[1]].expanded
    if kind == "out":
        return spec.blocks[slot[1]].out_ch
    if kind == "last":
        return spec.last_conv
    if kind == "hidden":
        return spec.last_channel
    raise ValueError(f"unknown slot {slot}")


def _slot_module(spec: ArchSpec, slot: Slot) -> str:
    if slot[0] == "stem":
        return "features.0"
    if slot[0] in ("exp", "out"):
        return f"features.{slot[1] + 1}"
    if slot[0] == "last":
        return f"features.{len(spec.blocks) + 1}"
    return "classifier.0"


def channel_groups(spec: ArchSpec) -> list[ChannelGroup]:
    """The network's channel groups in forward order (see the module docstring)."""
    n = len(spec.blocks)
    slots: list[Slot] = [("stem",)]
    for i in range(n):
        slots += [("exp", i), ("out", i)]
    slots += [("last",), ("hidden",)]
    parent = {s: s for s in slots}

    def find(s: Slot) -> Slot:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def union(a: Slot, b: Slot) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb, key=slots.index)] = min(ra, rb, key=slots.index)

    for i, b in enumerate(spec.blocks):
        if b.use_res_connect:
            union(_input_slot(i), ("out", i))
        if not b.has_expand:
            union(_input_slot(i), ("exp", i))
    members: dict[Slot, list[Slot]] = {}
    for s in slots:
        members.setdefault(find(s), []).append(s)
    groups = []
    for root, ss in members.items():
        kinds = {s[0] for s in ss}
        if kinds == {"exp"}:
            kind = "expansion"
        elif kinds <= {"stem", "out", "exp"}:
            kind = "bottleneck"
        else:
            kind = "head" if kinds == {"last"} else "hidden"
        mods = sorted({_slot_module(spec, s) for s in ss if s[0] != "exp" or kind == "expansion"},
                      key=lambda m: (m.startswith("classifier"), int(m.split(".")[1])))
        first, last = mods[0], mods[-1]
        where = first if first == last else f"{first}-{last.split('.')[1]}"
        groups.append(ChannelGroup(f"{kind}:{where}", kind, tuple(ss), _slot_size(spec, root)))
    return groups


def group_by_name(spec: ArchSpec, name: str) -> ChannelGroup:
    for g in channel_groups(spec):
        if g.name == name:
            return g
    raise UserError(f"no channel group {name!r}; groups: {', '.join(g.name for g in channel_groups(spec))}")


# -- which tensor dimension belongs to which slot ------------------------------------------------------

def _param_slots(spec: ArchSpec) -> dict[str, tuple]:
    """For every state_dict key: the slot of each tensor dimension that is sliced (None: never sliced)."""
    out: dict[str, tuple] = {}

    def bn(prefix: str, slot: Slot) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = (slot,)
        out[f"{prefix}.num_batches_tracked"] = ()

    out["features.0.0.weight"] = (("stem",), None)
    bn("features.0.1", ("stem",))
    for i, b in enumerate(spec.blocks):
        p, k = f"features.{i + 1}.block", 0
        inp = _input_slot(i)
        exp = ("exp", i) if b.has_expand else inp
        if b.has_expand:
            out[f"{p}.0.0.weight"] = (exp, inp)
            bn(f"{p}.0.1", exp)
            k += 1
        out[f"{p}.{k}.0.weight"] = (exp, None)
        bn(f"{p}.{k}.1", exp)
        k += 1
        if b.se_channels:
            se = ("se", i)
            out[f"{p}.{k}.fc1.weight"] = (se, exp)
            out[f"{p}.{k}.fc1.bias"] = (se,)
            out[f"{p}.{k}.fc2.weight"] = (exp, se)
            out[f"{p}.{k}.fc2.bias"] = (exp,)
            k += 1
        out[f"{p}.{k}.0.weight"] = (("out", i), exp)
        bn(f"{p}.{k}.1", ("out", i))
    last = f"features.{len(spec.blocks) + 1}"
    out[f"{last}.0.weight"] = (("last",), ("out", len(spec.blocks) - 1))
    bn(f"{last}.1", ("last",))
    out["classifier.0.weight"] = (("hidden",), ("last",))
    out["classifier.0.bias"] = (("hidden",),)
    out["classifier.3.weight"] = (None, ("hidden",))
    out["classifier.3.bias"] = (None,)
    return out


def _producers(spec: ArchSpec, group: ChannelGroup) -> list[tuple[str, str | None]]:
    """(weight key, BN prefix) of every non-depthwise layer whose output channels are the group's."""
    slots = set(group.slots)
    # a block without expansion has its "exp" slot tied to its input: its depthwise conv is not a producer
    found = []
    for key, dims in _param_slots(spec).items():
        if not key.endswith(".weight") or len(dims) < 2 or dims[0] not in slots or ".fc" in key:
            continue  # the SE's fc2 only gates the channels: not a producer
        if key.startswith("classifier"):
            found.append((key, None))
            continue
        if dims[1] is None:  # depthwise (or the stem's RGB input): the stem is a producer, a depthwise is not
            if key != "features.0.0.weight":
                continue
        found.append((key, key[: -len("0.weight")] + "1"))
    return found


# -- importance ----------------------------------------------------------------------------------------

@torch.no_grad()
def channel_importance(model: MobileNetV3, group: ChannelGroup, method: str = "l1") -> torch.Tensor:
    """One score per channel of ``group`` (higher: more important), summed over the layers producing it.

    ``l1`` / ``l2``: norm of each output filter, divided by the layer's mean filter norm (so layers of
    different scale count alike in a residual group); ``bn``: ``|gamma|`` of the BatchNorm after each producer
    (the classifier's hidden Linear has none and falls back to its L1 norm).
    """
    if method not in IMPORTANCE:
        raise UserError(f"importance must be one of {', '.join(IMPORTANCE)}, got {method!r}")
    sd = model.state_dict()
    score = torch.zeros(group.channels, dtype=torch.float64)
    for key, bn in _producers(model.spec, group):
        w = sd[key].flatten(1).double()
        if method == "bn" and bn is not None:
            s = sd[f"{bn}.weight"].double().abs()
        elif method == "l2":
            s = w.norm(p=2, dim=1)
        else:
            s = w.abs().sum(1)
        score += s / s.mean().clamp_min(1e-12)
    return score


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring channels, in their original order (ties: the lower index)."""
    if not 1 <= keep <= len(scores):
        raise ValueError(f"cannot keep {keep} of {len(scores)} channels")
    order = sorted(range(len(scores)), key=lambda c: (-float(scores[c]), c))[:keep]
    return torch.tensor(sorted(order), dtype=torch.long)


# -- removal ---------------------------------------------------------------------------------------

def se_channels_for(block: BlockConfig, expanded: int) -> int:
    """The SE squeeze width after the block's expansion becomes ``expanded``: the paper's 1/4 ratio, rounded to
    8, never wider than before (0 stays 0: no SE)."""
    if not block.se_channels:
        return 0
    if expanded == block.expanded:
        return block.se_channels
    return min(block.se_channels, make_divisible(expanded // 4, DIVISOR))


def pruned_spec(spec: ArchSpec, sizes: Mapping[str, int]) -> ArchSpec:
    """``spec`` with the channel count of each named group replaced (SE squeeze widths follow their block)."""
    groups = {g.name: g for g in channel_groups(spec)}
    slot_size: dict[Slot, int] = {}
    for name, n in sizes.items():
        if name not in groups:
            raise UserError(f"no channel group {name!r}; groups: {', '.join(groups)}")
        if n < 1:
            raise UserError(f"group {name} needs at least one channel, got {n}")
        for s in groups[name].slots:
            slot_size[s] = int(n)

    def size(slot: Slot) -> int:
        return slot_size.get(slot, _slot_size(spec, slot))

    blocks = []
    for i, b in enumerate(spec.blocks):
        exp = size(("exp", i)) if b.has_expand else size(_input_slot(i))
        blocks.append(dataclasses.replace(b, in_ch=size(_input_slot(i)), expanded=exp, out_ch=size(("out", i)),
                                          se_channels=se_channels_for(b, exp)))
    return spec.replace(blocks=tuple(blocks), last_conv=size(("last",)), last_channel=size(("hidden",)))


def structure_problems(old: ArchSpec, new: ArchSpec) -> list[str]:
    """Why ``new`` is not a pruning of ``old`` with the same structure (empty list: it is)."""
    problems = []
    if len(old.blocks) != len(new.blocks):
        return [f"{len(new.blocks)} blocks instead of {len(old.blocks)}"]
    for i, (a, b) in enumerate(zip(old.blocks, new.blocks)):
        if a.has_expand != b.has_expand:
            problems.append(f"block {i}: expansion width {b.expanded} equals its input {b.in_ch} "
                            f"(the expansion conv would disappear)")
        if a.use_res_connect != b.use_res_connect:
            problems.append(f"block {i}: input {b.in_ch} equals output {b.out_ch} (a residual would appear)")
        if bool(a.se_channels) != bool(b.se_channels):
            problems.append(f"block {i}: SE presence changed")
    return problems


@torch.no_grad()
def prune_channels(model: MobileNetV3, keep: Mapping[str, Sequence[int] | torch.Tensor],
                   importance: str = "l1") -> MobileNetV3:
    """A new, smaller network keeping, for each named group, the listed channel indices (others: all).

    Every tensor is sliced along the dimensions that belong to pruned slots; the SE squeeze channels of a
    block whose expansion changed keep the ``importance``-largest reduce filters.  The result is in the mode
    (train / eval) of ``model``.
    """
    spec = model.spec
    groups = {g.name: g for g in channel_groups(spec)}
    idx: dict[Slot, torch.Tensor] = {}
    for name, ch in keep.items():
        if name not in groups:
            raise UserError(f"no channel group {name!r}; groups: {', '.join(groups)}")
        t = torch.as_tensor(ch, dtype=torch.long).flatten()
        g = groups[name]
        if len(t) == 0 or len(set(t.tolist())) != len(t) or int(t.min()) < 0 or int(t.max()) >= g.channels:
            raise UserError(f"group {name}: keep indices must be distinct and in [0, {g.channels})")
        for s in g.slots:
            idx[s] = t
    new_spec = pruned_spec(spec, {n: len(t) for n, t in keep.items()})
    problems = structure_problems(spec, new_spec)
    if problems:
        raise UserError("pruning would change the block structure: " + "; ".join(problems))
    sd = model.state_dict()
    dims = _param_slots(spec)
    for i, (a, b) in enumerate(zip(spec.blocks, new_spec.blocks)):  # SE squeeze channels follow the block
        if b.se_channels and b.se_channels != a.se_channels:
            fc1 = next(k for k, d in dims.items() if d and d[0] == ("se", i) and k.endswith("fc1.weight"))
            exp_slot = dims[fc1][1]
            w = sd[fc1].flatten(1)
            if exp_slot in idx:
                w = w[:, idx[exp_slot]]
            s = w.pow(2).sum(1).sqrt() if importance == "l2" else w.abs().sum(1)
            idx[("se", i)] = keep_indices(s, b.se_channels)
    new_sd = {}
    for key, t in sd.items():
        for d, slot in enumerate(dims[key]):
            if slot is not None and slot in idx:
                t = t.index_select(d, idx[slot])
        new_sd[key] = t.clone()
    new = MobileNetV3(new_spec)
    new.load_state_dict(new_sd)
    new.train(model.training)
    return new.to(next(model.parameters()).device)


def shrink_group(model: MobileNetV3, group: str | ChannelGroup, channels: int, importance: str = "l1"
                 ) -> MobileNetV3:
    """Keep the ``channels`` most important channels of one group (a multiple of 8, at least 8)."""
    g = group if isinstance(group, ChannelGroup) else group_by_name(model.spec, group)
    if channels % DIVISOR or channels < DIVISOR:
        raise UserError(f"channel counts must be positive multiples of {DIVISOR}, got {channels}")
    if channels > g.channels:
        raise UserError(f"group {g.name} has {g.channels} channels; cannot keep {channels}")
    scores = channel_importance(model, g, importance)
    return prune_channels(model, {g.name: keep_indices(scores, channels)}, importance)


# -- architecture as data ------------------------------------------------------------------------------

def save_arch(path: str | os.PathLike, spec: ArchSpec) -> Path:
    """Write the architecture (channel counts per block, ...) as JSON, atomically."""
    return write_text(path, spec.to_json() + "\n")


def load_arch(path: str | os.PathLike) -> ArchSpec:
    try:
        return ArchSpec.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot read architecture {path}: {e}") from None


def rebuild(spec: ArchSpec | str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> MobileNetV3:
    """Build ``MobileNetV3(spec)`` from data (an ArchSpec or its JSON file) and load the weights into it."""
    if not isinstance(spec, ArchSpec):
        spec = load_arch(spec)
    model = MobileNetV3(spec)
    model.load_state_dict(dict(state_dict))
    return model

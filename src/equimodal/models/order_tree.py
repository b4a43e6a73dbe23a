"""Many coalitions and orders through the memory chain in one batched computation.

Shapley values under hybrid-order inference need, for every coalition ``S``, the memory
state averaged over the orders of the order set restricted to ``S``.
Run one coalition at a time, the chain recomputes the same prefixes again and again:
the state after reading ``(a, b)`` is the same whether the chain goes on with ``c`` or
stops. This module evaluates the chain once per *distinct prefix*:

* :func:`build_order_tree` collects every prefix of every (coalition, induced order) into
  a tree, level by level (level ``k`` holds the prefixes of length ``k``), and records
  which nodes end an order of which target, with what weight;
* :func:`tree_states` runs the tree on cached features, one level after the other. A
  level's nodes are grouped by the pair (modality read before, modality read now); each
  group is one matrix product, with the alignment ``C_ij + A_ij`` folded into the gate
  and candidate weights of the cell, and the gate term of the modality read now
  computed once per modality instead of once per node.

The result equals the per-coalition chain of :class:`~equimodal.models.memory.
CrossModalMemory` in evaluation mode (to float rounding); it needs every modality of the
tree present in every row (the caller falls back to the chain elsewhere). At ``M = 6``
with the default 24 hybrid orders the 63 coalitions need 1585 cell steps one coalition at
a time and 528 here; at ``M = 8`` 12140 and 3223.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from equimodal.models.memory import CrossModalMemory

#: default bound on the floats of one level's states (rows x nodes x width): 32 MiB
LEVEL_BUDGET = 1 << 23
#: floats per gate of the nodes whose gate arithmetic runs together (256 KiB: in cache)
SLAB = 1 << 16

WeightedOrders = Sequence[tuple[Sequence[int], float]]


@dataclass(frozen=True)
class TreeLevel:
    """The nodes of one depth of an :class:`OrderTree` (prefixes of one length).

    ``modality`` is the modality each node reads last; ``parent`` the index of its prefix
    one shorter in the level above (None at depth 1); ``groups`` ``(i, j, start, stop)``
    the contiguous runs of nodes that read ``j`` right after ``i``; ``out_target``,
    ``out_node``, ``out_weight`` the targets that end an order here, with the order's
    normalised weight.
    """

    modality: torch.Tensor
    parent: torch.Tensor | None
    groups: tuple[tuple[int, int, int, int], ...]
    out_target: torch.Tensor
    out_node: torch.Tensor
    out_weight: torch.Tensor

    def __len__(self) -> int:
        return int(self.modality.shape[0])


@dataclass(frozen=True)
class OrderTree:
    """Distinct prefixes of the weighted orders of several targets, level by level."""

    num_targets: int
    levels: tuple[TreeLevel, ...]

    @property
    def num_nodes(self) -> int:
        """Distinct prefixes (each one memory step on every row, the first level free)."""
        return sum(len(level) for level in self.levels)

    @property
    def max_width(self) -> int:
        """Nodes of the widest level."""
        return max((len(level) for level in self.levels), default=0)

    def modalities(self) -> list[int]:
        """Modality indices the tree reads."""
        return sorted({int(j) for level in self.levels for j in level.modality.tolist()})


def build_order_tree(targets: Sequence[WeightedOrders]) -> OrderTree:
    """The prefix tree of ``targets``: one list of ``(order, weight)`` per target.

    An order is a sequence of modality indices (no repeats); a target's state is the
    weighted mean (weights normalised to sum 1) of its orders' final states. Every target
    needs at least one non-empty order and a positive total weight.
    """
    depth_nodes: list[dict[tuple[int, ...], int]] = []
    finals: list[tuple[int, tuple[int, ...], float]] = []
    for t, orders in enumerate(targets):
        orders = [(tuple(int(i) for i in order), float(w)) for order, w in orders]
        total = sum(w for _, w in orders)
        if not orders or total <= 0 or any(not order for order, _ in orders):
            raise ValueError(f"target {t} needs non-empty orders with a positive total weight")
        for order, w in orders:
            if len(set(order)) != len(order):
                raise ValueError(f"order {order} of target {t} repeats a modality")
            while len(depth_nodes) < len(order):
                depth_nodes.append({})
            for k in range(1, len(order) + 1):
                depth_nodes[k - 1].setdefault(order[:k], -1)
            finals.append((t, order, w / total))
    # sort each level by (modality read before, modality read now) so that each pair's
    # nodes are contiguous; parents are indexed in the sorted level above
    for nodes in depth_nodes:
        for index, key in enumerate(sorted(nodes, key=lambda s: (s[-2:], s))):
            nodes[key] = index
    per_level_outputs: list[list[tuple[int, int, float]]] = [[] for _ in depth_nodes]
    for t, order, w in finals:
        per_level_outputs[len(order) - 1].append((t, depth_nodes[len(order) - 1][order], w))
    levels = []
    for depth, nodes in enumerate(depth_nodes):
        keys = sorted(nodes, key=nodes.__getitem__)
        modality = torch.tensor([key[-1] for key in keys], dtype=torch.long)
        parent = None
        groups: list[tuple[int, int, int, int]] = []
        if depth > 0:
            above = depth_nodes[depth - 1]
            parent = torch.tensor([above[key[:-1]] for key in keys], dtype=torch.long)
            for index, key in enumerate(keys):
                i, j = key[-2], key[-1]
                if groups and groups[-1][:2] == (i, j):
                    groups[-1] = (i, j, groups[-1][2], index + 1)
                else:
                    groups.append((i, j, index, index + 1))
        outputs = per_level_outputs[depth]
        levels.append(
            TreeLevel(
                modality=modality,
                parent=parent,
                groups=tuple(groups),
                out_target=torch.tensor([o[0] for o in outputs], dtype=torch.long),
                out_node=torch.tensor([o[1] for o in outputs], dtype=torch.long),
                out_weight=torch.tensor([o[2] for o in outputs], dtype=torch.float64),
            )
        )
    return OrderTree(num_targets=len(targets), levels=tuple(levels))


@dataclass(frozen=True)
class _PairWeights:
    """How the memory is mapped and fed to the cell for one pair (read before, read now).

    Folded (``align`` None): ``blocks[k] = (C_ij + A_ij) W_k^T`` and ``bias[k] = b_ij
    W_k^T`` for the forget, input, output and candidate blocks ``W_k`` of the cell's
    weights on the memory. Unfolded: ``h_aligned = h align + align_bias`` first, then the
    shared blocks ``W_k^T``. Folding costs ``4 d^3`` once and saves ``d^2`` per row and
    node, so it is used when the pair has at least ``4 d`` rows times nodes.
    """

    blocks: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None
    align: torch.Tensor | None
    align_bias: torch.Tensor | None


def _pair_weights(
    memory: CrossModalMemory, i: int, j: int, shared: tuple[torch.Tensor, ...], fold: bool
) -> _PairWeights:
    matrix = None
    bias = None
    if memory.align_stat:
        matrix = memory.corr_ema[i, j]
    if memory.align_learned:
        learned, bias = memory.learned_map(i, j)  # the pair's own parameters, no copy
        matrix = learned if matrix is None else matrix + learned
    if not fold or matrix is None:
        return _PairWeights(blocks=shared, bias=None, align=matrix, align_bias=bias)
    blocks = tuple(matrix @ w for w in shared)
    folded_bias = None if bias is None else torch.stack([bias @ w for w in shared])
    return _PairWeights(blocks=blocks, bias=folded_bias, align=None, align_bias=None)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


@torch.no_grad()
def tree_states(
    memory: CrossModalMemory,
    z: torch.Tensor,
    tree: OrderTree,
    readout: torch.nn.Linear | None = None,
    level_budget: int = LEVEL_BUDGET,
) -> torch.Tensor:
    """The state of every target of ``tree``, ``(T, B, d)``, from features ``(B, M, d)``.

    With ``readout`` (the classifier head) the result is the head applied to each
    target's state, ``(T, B, C)``: the head is affine and the weights sum to 1, so it is
    applied to each final node and the weighted sum taken over logits, which moves far
    less data than summing states. Evaluation only (the moving-average statistic ``C``,
    no alignment loss); every modality the tree reads must be present in every row. Rows
    are processed in chunks so that one level's states stay under ``level_budget`` floats.
    """
    if memory.training:
        raise RuntimeError("tree_states evaluates the memory; call it in eval mode")
    if _autocast_on(z.device.type):
        # the slabs are written in place into fp32 buffers: evaluate in fp32 under autocast
        with torch.autocast(z.device.type, enabled=False):
            return tree_states(memory, z.float(), tree, readout, level_budget)
    b, _, d = z.shape
    width = d if readout is None else readout.out_features
    out = z.new_zeros(tree.num_targets, b, width)
    if b == 0 or not tree.levels:
        return out
    device, dtype = z.device, z.dtype
    w_gates = memory.gates.weight  # (3d, 2d), acting on [x ; h_aligned]
    w_hc = torch.cat([w_gates[:, d:], memory.candidate.weight])  # (4d, d)
    shared = tuple(w.T.contiguous() for w in w_hc.chunk(4, dim=0))  # 4 x (d, d)
    bias_hc = torch.cat([memory.gates.bias, memory.candidate.bias]).view(4, 1, 1, d)
    rows = max(1, min(b, level_budget // max(1, tree.max_width * d)))
    nodes_of_pair: dict[tuple[int, int], int] = {}
    for level in tree.levels[1:]:
        for i, j, start, stop in level.groups:
            nodes_of_pair[(i, j)] = nodes_of_pair.get((i, j), 0) + stop - start
    weights = {
        pair: _pair_weights(memory, *pair, shared, fold=count * rows >= 4 * d)
        for pair, count in sorted(nodes_of_pair.items())
    }
    levels = [_to(level, device, dtype) for level in tree.levels]
    node_bias = [_node_bias(level, weights, z) for level in levels]
    for start in range(0, b, rows):
        zc = z[start : start + rows]
        # the terms of the modality read now, once per modality: x W_x^T + biases, as
        # (forget, input, output, candidate) x (M, rows, d)
        x_term = torch.cat(
            [zc @ w_gates[:, :d].T, zc.new_zeros(zc.shape[0], zc.shape[1], d)], dim=-1
        )
        x_term = x_term.permute(2, 1, 0).reshape(4, d, -1, zc.shape[0]).permute(0, 2, 3, 1)
        x_term = (x_term + bias_hc).contiguous()  # (4, M, rows, d)
        z_t = zc.transpose(0, 1).contiguous()  # (M, rows, d)
        acc = out[:, start : start + rows]
        states = None
        for depth, level in enumerate(levels):
            if depth == 0:
                states = z_t.index_select(0, level.modality)
            else:
                states = _step(states, level, z_t, x_term, weights, node_bias[depth])
            if level.out_node.numel():
                picked = states.index_select(0, level.out_node)
                if readout is not None:
                    picked = readout(picked)
                acc.index_add_(0, level.out_target, picked * level.out_weight[:, None, None])
    return out


def _to(level: TreeLevel, device: torch.device, dtype: torch.dtype) -> TreeLevel:
    return TreeLevel(
        modality=level.modality.to(device),
        parent=None if level.parent is None else level.parent.to(device),
        groups=level.groups,
        out_target=level.out_target.to(device),
        out_node=level.out_node.to(device),
        out_weight=level.out_weight.to(device=device, dtype=dtype),
    )


def _node_bias(
    level: TreeLevel, weights: dict[tuple[int, int], _PairWeights], like: torch.Tensor
) -> torch.Tensor | None:
    """The folded alignment bias of each node's pair, ``(4, n, 1, d)`` (None if none)."""
    if not level.groups or all(weights[(i, j)].bias is None for i, j, _, _ in level.groups):
        return None
    d = like.shape[-1]
    parts = []
    for i, j, start, stop in level.groups:
        bias = weights[(i, j)].bias
        bias = like.new_zeros(4, d) if bias is None else bias
        parts.append(bias.unsqueeze(1).expand(4, stop - start, d))
    return torch.cat(parts, dim=1).unsqueeze(2)


def _step(
    above: torch.Tensor,
    level: TreeLevel,
    z: torch.Tensor,
    x_term: torch.Tensor,
    weights: dict[tuple[int, int], _PairWeights],
    node_bias: torch.Tensor | None,
) -> torch.Tensor:
    """One level: each node's parent state goes through the cell with its own modality.

    ``z`` ``(M, r, d)``; ``x_term`` ``(4, M, r, d)``. The level is cut into slabs of
    consecutive pair groups of about ``SLAB`` floats per gate (cache-sized). Per group
    only the products with that pair's weights (four ``(n r, d) x (d, d)`` products into
    contiguous blocks of the slab's ``(4, n, r, d)`` buffer); the gate arithmetic runs
    once per slab, in place (strided slices of one wide product made it twice as slow).
    """
    _, r, d = z.shape
    new = above.new_empty(len(level), r, d)
    pending: list[tuple[int, int, int, int]] = []
    for index, group in enumerate(level.groups):
        pending.append(group)
        first = pending[0][2]
        if (group[3] - first) * r * d >= SLAB or index == len(level.groups) - 1:
            _slab(above, level, z, x_term, weights, node_bias, pending, new)
            pending = []
    return new


def _slab(above, level, z, x_term, weights, node_bias, groups, new) -> None:
    """The cell for the nodes of consecutive ``groups``, written into ``new``."""
    _, r, d = z.shape
    first, last = groups[0][2], groups[-1][3]
    parents = above.index_select(0, level.parent[first:last])  # (n, r, d)
    pre = above.new_empty(4, last - first, r, d)
    for i, j, start, stop in groups:
        h = parents[start - first : stop - first].view(-1, d)
        pw = weights[(i, j)]
        if pw.align is not None:
            h = h @ pw.align
            if pw.align_bias is not None:
                h += pw.align_bias
        for k in range(4):
            torch.mm(h, pw.blocks[k], out=pre[k, start - first : stop - first].view(-1, d))
    modality = level.modality[first:last]
    pre += x_term.index_select(1, modality)
    if node_bias is not None:
        pre += node_bias[:, first:last]
    pre[:3].sigmoid_()
    forget, inp, out, cand = pre
    # c = forget * x + inp * tanh(candidate); h = out * tanh(c)
    _tanh_(cand).mul_(inp).addcmul_(forget, z.index_select(0, modality))
    torch.mul(out, _tanh_(cand), out=new[first:last])


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place ``tanh(x) = 2 sigmoid(2x) - 1``: within 2e-7 of ``torch.tanh`` and about
    four times faster on CPU, where ``tanh`` is the slowest elementwise kernel here."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)

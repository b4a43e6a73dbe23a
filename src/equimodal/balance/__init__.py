"""Measurements of balance: Shapley values, EDM, modality orders."""

from equimodal.balance.edm import (
    EDMResult,
    contribution_shares,
    edm,
    minor_modalities,
    relative_edm,
)
from equimodal.balance.orders import all_orders, cyclic_shifts, hybrid_order_set, order_from_scores
from equimodal.balance.shapley import (
    ShapleyResult,
    all_coalitions,
    coalition_members,
    draw_permutations,
    exact_shapley,
    exact_shapley_from_table,
    required_coalitions,
    sampled_shapley,
    shapley_values,
)

__all__ = [
    "EDMResult",
    "ShapleyResult",
    "all_coalitions",
    "all_orders",
    "coalition_members",
    "contribution_shares",
    "cyclic_shifts",
    "draw_permutations",
    "edm",
    "exact_shapley",
    "exact_shapley_from_table",
    "hybrid_order_set",
    "minor_modalities",
    "order_from_scores",
    "relative_edm",
    "required_coalitions",
    "sampled_shapley",
    "shapley_values",
]

"""Analysis of trained SAEs: exact per-head and per-source-position attribution for attention SAEs
(docs/architecture.md#attribution)."""

from fusedsae.analysis.attribution import (
    CONVENTIONS,
    HeadContributions,
    feature_constant,
    head_contributions,
    single_head_ablations,
    source_contributions,
    weight_head_shares,
)

__all__ = [
    "CONVENTIONS",
    "HeadContributions",
    "feature_constant",
    "head_contributions",
    "single_head_ablations",
    "source_contributions",
    "weight_head_shares",
]

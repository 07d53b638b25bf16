"""Expert pruning (Lu et al., ACL 2024) with streaming calibration and exact subset search."""

from moe_fast.pruning.pipeline import LayerResult, PruneReport, PruneResult, prune

__all__ = ["prune", "PruneReport", "PruneResult", "LayerResult"]

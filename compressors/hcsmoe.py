"""HC-SMoE (Chen et al. 2024, arXiv 2410.08589): merge experts by hierarchical clustering of their outputs.

Per MoE layer, from the shared observer pass (compressors/observer.py; expert-compression.md §4-5):
- feature o_i = mean E_i(x) over **all** calibration tokens (every expert run on every token, no gating);
- average-linkage agglomerative clustering on Euclidean distances (scipy `linkage(o, "average")`), cut after
  the first E−k merges into exactly k = E − int(E·ratio) clusters (the same count every method removes;
  equal to scipy's `fcluster(..., k, "maxclust")` whenever merge heights are distinct);
- each cluster C is merged by routing frequency f_i = routed slots / tokens, per fused tensor (gate and up rows
  of `gate_up_proj`, `down_proj`): W_C = Σ_{i∈C} f_i W_i / (Σ_{i∈C} f_i + ε), ε = float32 eps (a cluster that
  was never routed becomes a zero expert); singletons are kept bit for bit.

Router, two registered methods:
- `hcsmoe` (default, as the REAP-repo baseline the paper extended): every router row is kept and every member
  slot computes its cluster's merged expert, so a token routed to several members gets the merged expert once
  per member (= summed gates). transformers' fused `[E, …]` tensors cannot share storage between slots, so the
  merged expert is stored once **per member** (copies): same architecture, same expert count, same size
  (manifest `storage`).
- `hcsmoe-shrink`: one expert and one router row per cluster (config expert count ← k), a physically smaller
  checkpoint. A cluster's router row is w_C = Σ q_i w_i with q_i = f_i / Σ_{j∈C} f_j (uniform when Σ f = 0);
  correction biases (ERNIE) combine the same way. Why: the ideal cluster logit log Σ_{i∈C} exp(w_i·x) (so the
  cluster's probability is its members' total) is not linear in x; since LSE(z) = Σ_i s_i z_i + H(s) with s
  the in-cluster softmax, w_C is LSE's linear part at the calibration routing shares, dropping the entropy
  term H ∈ [0, log|C|] that a bias-free router row cannot carry. Guaranteed (and tested): singleton rows are
  unchanged, w_C is that convex combination, so for every token min_i z_i ≤ z_C ≤ max_i z_i ≤ LSE(z_C), and
  members with identical rows give that row. The cluster's probability is therefore under-estimated
  (by at most a factor |C|·e^(max−min)); renormalised top-k models (Qwen3, Mixtral, ERNIE) only see the
  ratios among selected clusters. Ids read `hcsmoe-shrink-r50-…`: `-k shrink` selects it,
  `-k "hcsmoe and not shrink"` the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from architectures.blocks import MoEBlock
from compressors.base import MoEInfo, register
from compressors.expert_pruning import ObservedExpertCompressor
from compressors.expert_slicing import remap_block
from compressors.observer import LayerStats

if TYPE_CHECKING:
    import numpy as np
    import torch

STORAGE = {
    False: "copies: every member slot holds its cluster's merged expert (transformers' fused experts cannot "
           "share storage), router rows unchanged; same expert count and size as the dense model",
    True: "shrunk: one expert and one router row per cluster; expert count = clusters",
}


def average_linkage_clusters(features: np.ndarray, k: int) -> list[list[int]]:
    """Average-linkage (Euclidean) clusters of the rows of `features`, cut into exactly `k` clusters.

    Applies the first n−k merges of scipy's linkage (union of the two merged groups each time); clusters are
    returned with ascending members, ordered by their smallest member."""
    import numpy as np
    from scipy.cluster.hierarchy import linkage

    n = len(features)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} experts into {k} clusters")
    groups: dict[int, list[int]] = {i: [i] for i in range(n)}
    if n > 1 and k < n:
        tree = linkage(np.asarray(features, dtype=np.float64), method="average", metric="euclidean")
        for step, (left, right, _, _) in enumerate(tree[: n - k]):
            groups[n + step] = groups.pop(int(left)) + groups.pop(int(right))
    return sorted((sorted(members) for members in groups.values()), key=lambda members: members[0])


def merge_terms(clusters: Sequence[Sequence[int]], frequency: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per cluster, the (member, f_i / (Σ f + ε)) terms of W_C; a singleton is a plain copy."""
    import torch

    eps = float(torch.finfo(torch.float32).eps)
    terms = []
    for members in clusters:
        if len(members) == 1:
            terms.append([(members[0], 1.0)])
            continue
        total = sum(float(frequency[i]) for i in members)
        terms.append([(i, float(frequency[i]) / (total + eps)) for i in members])
    return terms


def router_terms(clusters: Sequence[Sequence[int]], frequency: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per cluster, the convex weights q_i = f_i / Σ f (uniform if never routed) of its router row."""
    terms = []
    for members in clusters:
        total = sum(float(frequency[i]) for i in members)
        terms.append([(i, float(frequency[i]) / total if total > 0 else 1.0 / len(members)) for i in members]
                     if len(members) > 1 else [(members[0], 1.0)])
    return terms


@register
class HCSMoECompressor(ObservedExpertCompressor):
    """HC-SMoE merging; every router row kept, members computing their cluster's merged expert."""

    name: ClassVar[str] = "hcsmoe"
    shrink: ClassVar[bool] = False
    removes_experts: ClassVar[bool] = False

    def edit(self, blocks: list[MoEBlock], stats: Mapping[str, LayerStats], info: MoEInfo,
             removed: int) -> tuple[int, dict[str, Any]]:
        clusters_by_layer, frequencies = {}, {}
        for block in blocks:
            layer = stats[block.name]
            k = block.num_experts - removed
            clusters = average_linkage_clusters(layer.mean_output.numpy(), k)
            merged = merge_terms(clusters, layer.frequency)
            if self.shrink:
                remap_block(block, merged, router_terms(clusters, layer.frequency))
            else:
                owner = {i: c for c, members in enumerate(clusters) for i in members}
                remap_block(block, [merged[owner[i]] for i in range(block.num_experts)], None)
            clusters_by_layer[block.name] = clusters
            frequencies[block.name] = [float(f) for f in layer.frequency]
        experts_after = info.num_experts - removed if self.shrink else info.num_experts
        return experts_after, {
            "clusters": clusters_by_layer, "clusters_per_layer": info.num_experts - removed,
            "frequency": frequencies, "router": "shrunk" if self.shrink else "all rows kept",
            "storage": STORAGE[self.shrink],
            "merge": "W_C = sum f_i W_i / (sum f_i + eps), f_i = routed slots / tokens; singletons untouched",
        }


@register
class HCSMoEShrinkCompressor(HCSMoECompressor):
    """HC-SMoE with one expert and one router row per cluster (a smaller checkpoint)."""

    name: ClassVar[str] = "hcsmoe-shrink"
    shrink: ClassVar[bool] = True
    removes_experts: ClassVar[bool] = True

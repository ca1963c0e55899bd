"""Weight sharing: modifiers that leave each target weight with at most 2^bits distinct nonzero
values, so that it can be stored as a small codebook plus entropy-coded indices (Deep
Compression: fastserve.model.shared).

kmeans.py   per-tensor 1-D k-means over the nonzero weights, linear initialisation (Han et al.
            2016, "Deep Compression"), vectorised Lloyd iterations; the `KMeans` modifier

A weight-shared linear becomes a `SharedLinear` (an nn.Linear that computes the same; its type
tells save_model to store it deep-compressed). Weight sharing keeps pruned zeros exactly (they
are not a centroid), so it composes after the pruning modifiers of a recipe; it must be the last
modifier that touches its linears (Recipe.resolve checks it) and cannot follow a quantizing one.

What it does not know: how the archive is coded or stored (fastserve.model.shared, records.py).
"""

from fastserve.compress.share.kmeans import KMeansModifier, kmeans_1d, share_weight

__all__ = ["KMeansModifier", "kmeans_1d", "share_weight"]

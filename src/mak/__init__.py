"""mak: open-world data sampling for self-supervised learning.

Model-Aware K-center (MAK; Jiang, Chen, Chen, Wang, NeurIPS 2021) and its baselines pick the
pool images that most help contrastive pre-training on a small, long-tailed seed set.

Public API (see each module for details)::

    mak.ecle(views, ...)                       # tailness: empirical contrastive loss expectation
    mak.nearest_centroid_distance(feats, cen)  # 1 - max cosine similarity to centroids
    mak.proximity(seed_feats, pool_feats, ...) # distance to the seed's k-means centroids
    mak.kcenter_greedy(feats, budget, init=..) # diversity: greedy k-center
    mak.select(seed_feats, pool_feats, pool_views, budget, strategy="mak", ...)
"""
__version__ = "0.1.0"

from mak.errors import MakError  # noqa: E402
from mak.selection.kcenter import kcenter_greedy  # noqa: E402
from mak.selection.proximity import kmeans, nearest_centroid_distance, proximity  # noqa: E402
from mak.selection.strategies import STRATEGIES, Selection, select  # noqa: E402
from mak.selection.tailness import ecle  # noqa: E402

__all__ = [
    "MakError",
    "STRATEGIES",
    "Selection",
    "ecle",
    "kcenter_greedy",
    "kmeans",
    "nearest_centroid_distance",
    "proximity",
    "select",
    "__version__",
]

from mak.selection import robust  # noqa: F401,E402  (registers the 'robust' strategy)
from mak.selection.robust import rank_fusion, rank_normalize, seed_gate  # noqa: E402

__all__ += ["rank_fusion", "rank_normalize", "seed_gate"]

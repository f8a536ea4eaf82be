"""The selection engine: scores and strategies over feature arrays, no images, no files.

:mod:`.strategies` holds the registry, the :class:`~.strategies.Context` strategies read their
scores from, :func:`~.strategies.select` and the paper's strategies; :mod:`.tailness` (ECLE),
:mod:`.proximity` (k-means distance) and :mod:`.kcenter` (greedy k-center) are MAK's three parts;
:mod:`.robust` (with :mod:`.robust.density_ratio`) the ``robust`` strategy; :mod:`.scale` the same engine
across torchrun ranks, with sharded k-center and near-duplicate removal.
"""
from mak.selection import robust  # noqa: F401,E402  (registers the 'robust' strategy with the registry)

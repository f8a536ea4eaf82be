"""Selection at web scale: the distributed context (:mod:`.context`), sharded and two-round
k-center (:mod:`.kcenter`) and near-duplicate removal (:mod:`.dedup`)."""

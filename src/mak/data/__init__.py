"""Data: where images come from (:mod:`.sources`), the feature stores embeddings live in
(:mod:`.store`) and lazy row views over a sharded store (:mod:`.pool_array`)."""

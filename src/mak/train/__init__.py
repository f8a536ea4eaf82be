"""Training and embedding: backbones and the SimCLR model (:mod:`.models`), NT-Xent (:mod:`.losses`),
augmentation (:mod:`.augment`, with the fused C kernel of :mod:`.native`), SimCLR pre-training
(:mod:`.pretrain`) and feature stores from a checkpoint (:mod:`.embed`)."""

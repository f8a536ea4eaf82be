"""Training and embedding: backbones and the SimCLR model (:mod:`.models`), NT-Xent (:mod:`.losses`),
augmentation (:mod:`.augment`, with the fused C kernel of :mod:`.native`), SimCLR pre-training
(:mod:`.pretrain`; device and precision policy in :mod:`.device`, CPU SyncBatchNorm for gloo in
:mod:`.syncbn`) and feature stores from a checkpoint (:mod:`.embed`)."""

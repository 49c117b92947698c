from fastrsb.augment.batch import BatchAugment, build_batch_augment
from fastrsb.augment.randaugment import RandAugment, apply_op

__all__ = ["BatchAugment", "RandAugment", "apply_op", "build_batch_augment"]

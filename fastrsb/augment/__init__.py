from fastrsb.augment.batch import BatchAugment
from fastrsb.augment.randaugment import RandAugment, apply_op

__all__ = ["BatchAugment", "RandAugment", "apply_op"]

from fastrsb.augment.batch import BatchAugment, build_batch_augment

__all__ = ["BatchAugment", "build_batch_augment"]

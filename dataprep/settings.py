"""What a conversion's output depends on (`fastrsb convert`'s flags of the same names), apart from the converter, so
that reading a dataset (dataprep.layout) can name the command that made it without importing the converter."""
from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("ffcv", "dali")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")


class ConversionError(RuntimeError):
    """The conversion cannot proceed, or (with strict) found files it had to skip."""


@dataclass(frozen=True)
class Settings:
    formats: tuple[str, ...] = FORMATS
    max_resolution: int = 512
    jpeg_quality: int = 90
    write_mode: str = "jpg"
    compress_probability: float = 0.5
    smart_threshold: int | None = None
    shard_size: int = 1024
    reencode: bool = False  # re-encode every image, even JPEGs that could be stored as they are
    # store a class-folder source's samples in a seeded random order, not by (label, path): data.order=block reads
    # the store in blocks of consecutive samples, which on a label-sorted store are a few classes each
    shuffle_store: bool = False

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))  # a list from a caller: hashable, and JSON alike

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConversionError(f"--formats: unknown format {bad or '(none)'}; choose from {', '.join(FORMATS)}")
        if self.max_resolution < 8:
            raise ConversionError(f"--max-resolution must be >= 8 pixels, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConversionError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.write_mode not in WRITE_MODES:
            raise ConversionError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {self.write_mode!r}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ConversionError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.shard_size < 1:
            raise ConversionError(f"--shard-size must be >= 1, got {self.shard_size}")

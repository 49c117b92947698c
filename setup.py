from setuptools import find_packages, setup

# torch/torchvision are pinned to the builds the project is tested with; ffcv
# compiles against Debian's libopencv-dev/libturbojpeg (scripts/bootstrap.sh).
CORE = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm>=1.0",
    "numpy",
    "numba",  # RandAugment's CPU kernels (fastrsb/augment/randaugment_cpu.py)
    "pillow",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "scikit-learn",  # ships the embedded demo dataset (handwritten digits)
]
FFCV = ["ffcv==1.0.2", "opencv-python"]
DALI = ["nvidia-dali-cuda120"]
TEST = ["pytest", "pytest-timeout", "scikit-image"]

setup(
    name="fastrsb",
    version="0.1.0",
    description="A data-loading-centric trainer for ResNet-strikes-back recipes (FFCV/DALI loaders, device-side augmentation)",
    packages=find_packages(include=["fastrsb", "fastrsb.*", "dataprep", "dataprep.*", "benchmarks", "benchmarks.*"]),
    package_data={"": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"ffcv": FFCV, "dali": DALI, "test": TEST, "all": FFCV + DALI + TEST},
    entry_points={"console_scripts": ["fastrsb=fastrsb.cli:main"]},
)

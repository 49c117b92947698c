from setuptools import find_packages, setup

# torch/torchvision are ranges, not pins: from the oldest release the tests have passed on (torch 2.11.0 +
# torchvision 0.26.0, the lent GPU machine's and many clusters' site torch) to below the next major. A pin would
# make `pip install -e .` replace an existing, working torch with a ~5 GB download of another build.
# scripts/bootstrap.sh installs the exact tested builds (torch 2.14.1, torchvision 0.29.1) on a fresh machine
# before this file is read. ffcv compiles against Debian's libopencv-dev/libturbojpeg (scripts/bootstrap.sh).
CORE = [
    "torch>=2.11,<3",
    "torchvision>=0.26,<1",
    "timm>=1.0",
    "numpy",
    "numba",  # RandAugment's CPU kernels (fastrsb/augment/randaugment_numba.py)
    "pillow",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "scikit-learn",  # ships the embedded demo dataset (handwritten digits)
]
FFCV = ["ffcv==1.0.2", "opencv-python"]
# DALI's wheel must match torch's CUDA major: the torch builds above are CUDA 13 (torch.version.cuda 13.0).
# 2.4.0 is the release the tests ran; DALI deprecates and renames ops between minor releases.
DALI = ["nvidia-dali-cuda130==2.4.0"]
# data.torch_decode=device decodes with torchcodec where it works (torchvision 0.29 deprecates its decoders for it);
# a torchcodec release is built for one torch minor (0.17 for 2.14): one that cannot load falls back to torchvision
# with a warning (fastrsb/data/torch_device_decode.py). Its decode_jpeg arrived in 0.16.
TORCHCODEC = ["torchcodec>=0.16"]
# The Hub's parquet shards (`fastrsb convert` of SRC/data/*.parquet); 26 is the release the tests ran.
HUB = ["pyarrow>=26"]
TEST = ["pytest", "pytest-timeout", "scikit-image"]

setup(
    name="fastrsb",
    version="0.1.0",
    description="A data-loading-centric trainer for ResNet-strikes-back recipes (FFCV/DALI loaders, device-side augmentation)",
    packages=find_packages(include=["fastrsb", "fastrsb.*", "dataprep", "dataprep.*", "benchmarks", "benchmarks.*"]),
    package_data={"": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"ffcv": FFCV, "dali": DALI, "torchcodec": TORCHCODEC, "hub": HUB, "test": TEST,
                    "all": FFCV + DALI + TORCHCODEC + HUB + TEST},
    entry_points={"console_scripts": ["fastrsb=fastrsb.cli:main"]},
)

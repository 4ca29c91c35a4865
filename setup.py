from setuptools import find_packages, setup

setup(
    name="pcl",
    version="0.1.0",
    description="Prototypical Contrastive Learning (Li et al., ICLR 2021): a faithful, fast PyTorch reproduction",
    packages=find_packages(include=["pcl", "pcl.*"]),
    py_modules=["main_pcl"],
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "scikit-learn",
        "PyYAML",
        "tqdm",
        "tensorboard",
    ],
    # faiss is an extra, chosen per machine: faiss-cpu and a faiss GPU wheel both install the module `faiss`, so
    # they must never be installed together. Without either, the E-step uses the PyTorch k-means (CPU or CUDA).
    extras_require={
        "cpu": ["faiss-cpu>=1.7.4"],
        # faiss-cuda: GPU faiss for Python 3.11-3.14 built for sm_80-sm_100 (A100, H100/H200, B200); it pulls
        # its own CUDA 12 runtime and cuBLAS from PyPI, so it installs next to a CUDA 12 or 13 PyTorch
        "gpu": ["faiss-cuda; python_version >= '3.11'"],
        "test": ["pytest", "matplotlib"],  # matplotlib: the t-SNE figure's tests
        "plots": ["matplotlib"],
    },
)

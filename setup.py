from setuptools import find_packages, setup

setup(
    name="pcl",
    version="0.1.0",
    description="Prototypical Contrastive Learning (Li et al., ICLR 2021): a faithful, fast PyTorch reproduction",
    packages=find_packages(include=["pcl", "pcl.*"]),
    py_modules=["main_pcl"],
    python_requires=">=3.10",
    install_requires=[
        # torch 2.4 / torchvision 0.19: init_process_group(device_id=...) and decode_jpeg on a list of files
        # with device=... (--decode device's batched nvJPEG decode)
        "torch>=2.4",
        "torchvision>=0.19",
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
        # faiss-gpu: the faiss project's own GPU wheel (1.15.1, abi3 for CPython >= 3.10). Read off the wheel: SASS
        # for sm_70/75/80/86/89/90 and PTX for sm_90, so V100 to H100/H200 run native code (B200 JIT-compiles
        # the sm_90 PTX); it pulls its own CUDA 12 runtime, cuBLAS and cuRAND (>= 12.6) from PyPI, beside the
        # CUDA build of PyTorch
        "gpu": ["faiss-gpu>=1.15.1,<1.16"],
        "test": ["pytest", "matplotlib"],  # matplotlib: the t-SNE figure's tests
        "plots": ["matplotlib"],
        "wandb": ["wandb"],  # --wandb: the same logs in Weights & Biases (WANDB_MODE=offline works without a server)
    },
)

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
        "faiss-cpu>=1.7.4",
        "numpy",
        "scikit-learn",
        "PyYAML",
        "tqdm",
        "tensorboard",
    ],
    extras_require={"test": ["pytest"], "gpu": ["faiss-gpu"], "plots": ["matplotlib"]},
)

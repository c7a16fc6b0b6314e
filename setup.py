from setuptools import setup

# parallel/ and data_pipeline/ live at the top of the repository (the layout the project asked
# for) but are installed as subpackages of magitrain, so only one name goes on the import path.
PACKAGE_DIR = {
    "magitrain": "magitrain",
    "magitrain.parallel": "parallel",
    "magitrain.data_pipeline": "data_pipeline",
    "magitrain.launch": "launch",
    "magitrain.configs": "configs",
}

setup(
    name="magitrain",
    version="0.1.0",
    description="Distributed training for chunk-causal (MAGI-1-style) autoregressive video diffusion transformers",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"magitrain.launch": ["*.sh", "k8s/*.yaml"], "magitrain.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.6,<2.15",
        "numpy>=1.24",
        "omegaconf>=2.3,<2.5",
        "webdataset>=0.2.86,<2",
        "torchdata>=0.10,<0.12",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "av>=12",
        "pillow>=9",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "deepspeed": ["deepspeed>=0.15,<0.20"],
        "megatron": ["megatron-core>=0.12"],
        "wandb": ["wandb>=0.17"],  # log.wandb=true (offline by default)
        "release": ["zstandard>=0.22"],
        # MAGI-1's T5 caption path (--text-encoder t5): transformers' T5 encoder, its tokenizer, the caption cleaner
        "t5": ["transformers>=4.40", "tokenizers>=0.19", "sentencepiece>=0.1.99", "protobuf>=3.20", "ftfy>=6",
               "beautifulsoup4>=4.9"],
        "lora": ["peft>=0.13"],  # only to load an exported adapter into PEFT (tests/test_lora.py); training needs none
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.5",
                # offline schema checks of the Kubernetes / PyTorchJob manifests (tests/test_launch_k8s.py)
                "kubernetes-validate>=1.28", "kubeflow-training>=1.8,<2", "jsonschema>=4.18"],
    },
    entry_points={
        "console_scripts": [
            "magitrain=magitrain.cli:main",
            "magitrain-train=magitrain.train:main",
        ],
    },
)

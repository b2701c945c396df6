from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dalle-ds",
    version="0.1.0",
    description="Distributed DALL-E training with DeepSpeed ZeRO, sparse and reversible attention, and CLIP reranking",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dalle_ds", "dalle_ds.*"]),
    # the fused CPU attention kernel's source, compiled on first use (dalle_ds/attention/native.py)
    package_data={"dalle_ds.attention": ["csrc/*.cpp"]},
    # the shipped DeepSpeed configs, for installs outside a checkout (see training/engine.py)
    data_files=[("share/dalle_ds/ds_configs", sorted(str(p) for p in Path("ds_configs").glob("*.json")))],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed>=0.19,<0.20",
        "einops>=0.8,<1",
        "safetensors>=0.4,<1",
        "sentencepiece>=0.2,<0.3",
        "webdataset>=0.2.90,<2",
        "braceexpand>=0.1.7,<0.2",  # shard patterns (data/shards.py); webdataset uses it too, but we import it
        "tensorboard>=2.15,<3",
        "pillow>=10,<13",
        "numpy>=1.24,<3",
        "pyyaml>=6,<7",
        "tqdm>=4.60,<5",
    ],
    entry_points={"console_scripts": ["dalle-ds=dalle_ds.cli:entry_point"]},
    extras_require={
        "dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3"],
    },
)

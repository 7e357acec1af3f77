from setuptools import find_packages, setup

setup(
    name="vla_foundry_jax",
    version="0.1.0",
    description="LLM -> VLM -> VLA training in JAX/Flax NNX, configured with gin",
    packages=find_packages(
        include=["vla_foundry_jax", "vla_foundry_jax.*", "vla_foundry_jax_client", "launch", "launch.*"]
    ),
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt") if line.strip() and not line.startswith("#")],
    # optional trackers: experiment.wandb_project logs to Weights & Biases (pip install .[wandb])
    extras_require={"wandb": ["wandb>=0.19"]},
)

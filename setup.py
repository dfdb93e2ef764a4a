"""fastsp: a performance-first trainer for diffusion models with the self-perceptual objective.

`kernels/` (the Triton kernels) is installed as the subpackage `fastsp.kernels`: a bare top-level
`kernels` would collide with Hugging Face's `kernels` (a dependency of transformers 5). From the
repository root, where Python finds the folder itself first, kernels/__init__.py hands the bare
name over to the installed package.
"""

from setuptools import setup

SD = ["diffusers>=0.30", "transformers>=4.40"]

setup(
    name="fastsp",
    version="0.1.0",
    description="Performance-first diffusion trainer with the self-perceptual objective",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastsp", "fastsp.kernels", "fastsp.training"],
    package_dir={"fastsp": "fastsp", "fastsp.kernels": "kernels"},
    # fastsp.dryrun compiles its fake-CUDA extension from this source at first use
    package_data={"fastsp": ["fake_cuda.cpp"]},
    install_requires=[
        # No upper pin: on CPU machines install torch first (README) so pip keeps that build.
        "torch>=2.10",
        "triton>=3.2; platform_system == 'Linux'",
        # xformers has CUDA operators only; torch SDPA serves every other device.
        "xformers>=0.0.30; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy>=1.24",
        # The embedded default data set (8x8 digits) ships inside scikit-learn.
        "scikit-learn>=1.3",
        "pillow>=10.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # Stable Diffusion: diffusers UNets in and out, the VAE and the CLIP text encoder for
        # data preparation and prompt sampling (fastsp.sd_components). Never needed for digits.
        "sd": SD,
        # The built-in letters (--data letters) render the fonts that ship inside matplotlib.
        "letters": ["matplotlib>=3.5"],
        # LoRA adapters (--lora-rank, fastsp.lora): peft's LoraConfig and adapter switches.
        "lora": ["peft>=0.17"],
        # The tests build tiny random diffusers and transformers models in the test itself.
        "dev": [
            *SD,
            "peft>=0.17",
            "pytest>=8",
            "pytest-xdist>=3.6",  # the suite's parallel workers (pyproject.toml's addopts)
            "filelock>=3",  # what the workers build once for all of them (tests/conftest.py)
            "pytest-benchmark>=4",
            "ruff>=0.5",
            "build>=1.0",
            "wheel",
            "matplotlib>=3.5",  # the letters data set; the figures of benchmarks/quality/
        ],
    },
    entry_points={
        "console_scripts": [
            "fastsp-train=fastsp.train:main",
            "fastsp-sample=fastsp.sample:main",
        ],
    },
)

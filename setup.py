from setuptools import setup

# Runtime dependencies, and why each is here:
#   torch, numpy: tensors and the reference; triton: the fused kernels (Linux wheels only);
#   safetensors: model weights without pickle; Pillow: images (targets, PNG frames);
#   imageio: GIF and MP4 writing; tqdm: progress bars; matplotlib: loss curves and bench plots.
install_requires = [
    "torch>=2.4",
    "numpy",
    # triton: every release a current PyTorch pins (torch 2.11: 3.6, 2.12: 3.7, 2.14: 3.8,
    # 2.15: 3.9). No upper bound: a newer Triton installs, and the Triton backend warns that it
    # is outside the verified range (nca_fast/backends/interface.py, VERIFIED_TRITON).
    "triton>=3.6; platform_system == 'Linux'",
    "safetensors>=0.4",
    "Pillow>=9",
    "imageio>=2.20",
    "tqdm>=4.60",
    "matplotlib>=3.6",
]

extras_require = {
    # pytest-benchmark: bench/ suites; hypothesis: property tests of config and shapes.
    "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "build", "wheel"],
    # imageio-ffmpeg: MP4 output (GIF needs nothing more).
    "video": ["imageio-ffmpeg"],
}

setup(
    name="nca-fast",
    version="0.1.0",
    description="Fused Triton kernels and a PyTorch reference for Growing Neural Cellular Automata",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["nca_fast", "nca_fast.backends", "nca_fast.backends.torch_backend",
              "nca_fast.training", "nca_fast.export", "nca_fast.kernels"],
    package_dir={"nca_fast": "nca_fast", "nca_fast.kernels": "kernels"},
    package_data={"nca_fast": ["assets/*"], "nca_fast.export": ["*.js", "*.html"]},
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["nca-fast = nca_fast.cli:main"]},
)

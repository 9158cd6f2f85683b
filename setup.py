from setuptools import setup

ONNX = ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.18"]
# transformers' ParakeetEncoder (4.57+); convolution_bias (use_bias: false encoders) is in the pinned 5.23
HF = ["transformers>=4.57", "safetensors>=0.4"]
# lhotse (use_lhotse: true). lhotse 1.33 imports urllib3 without declaring it, so the extra pulls it.
LHOTSE = ["lhotse>=1.33", "urllib3>=2"]

setup(
    name="nest_ssl",
    version="0.1.0",
    description="Plain-PyTorch NEST self-supervised speech pretraining (NeMo-compatible), with Triton kernels",
    python_requires=">=3.10",
    # kernels/ ships as nest_ssl.kernels: the top-level name `kernels` is taken on the package registry. The symlink
    # nest_ssl/kernels -> ../kernels makes the same import work from a plain checkout, with no install.
    packages=["nest_ssl", "nest_ssl.conformer", "nest_ssl.contrastive", "nest_ssl.data", "nest_ssl.nest",
              "nest_ssl.testing", "nest_ssl.kernels"],
    install_requires=[
        "torch>=2.4",
        "torchaudio>=2.4",
        "numpy>=1.24",
        "soundfile>=0.12",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    # dev includes the onnx and hf extras so that `make test` exercises the ONNX export and its onnxruntime check,
    # the Hugging Face round trip and the Lhotse data path.
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "ruff>=0.5", *ONNX, *HF, *LHOTSE],
        "onnx": ONNX,
        "hf": HF,
        "lhotse": LHOTSE,
    },
)

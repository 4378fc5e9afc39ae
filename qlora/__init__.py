"""Loading a causal LM in 4-bit with LoRA, and the dry run: the only package that imports transformers,
peft and bitsandbytes."""

"""The task-level classes: backbone, tokenizer, preprocessor and causal LM."""

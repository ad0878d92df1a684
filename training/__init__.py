"""From chat exports to a private training dataset, and from it to a LoRA adapter of the base model."""

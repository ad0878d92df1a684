"""From chat exports to a private training dataset, and (later) to a LoRA adapter."""

"""The clone at work: the chat engine, its memory, and the platform adapters."""

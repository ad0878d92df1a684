"""The clone at work: the engine (no platform, no torch), its memory and gate, one platform-free
conversation flow under thin Telegram and Discord adapters, and the generation backends."""

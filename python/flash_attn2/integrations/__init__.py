"""Integrations of flash_attn2 with other libraries (each imports its library lazily, on use)."""

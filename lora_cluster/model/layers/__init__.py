"""TP/EP-aware layers with their own weight loaders and LoRA slots."""

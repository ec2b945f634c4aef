"""Decoder model: spec, TP/EP-aware layers with LoRA slots, attention, KV cache, loading."""

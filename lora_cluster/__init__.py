"""lora_cluster."""

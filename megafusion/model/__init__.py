"""The fused model: imports nothing from deepspeed (shipped as HF remote code)."""

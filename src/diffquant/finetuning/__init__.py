"""Quantized fine-tuning: learned step sizes (LSQ), QALoRA adapters and data-free distillation."""

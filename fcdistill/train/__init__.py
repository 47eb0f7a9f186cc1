"""Training: LoRA SFT with TRL + PEFT around the function-call token."""

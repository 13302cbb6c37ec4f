"""reft_lab: representation finetuning beside LoRA/DoRA and full fine-tuning, with accounting."""

__version__ = "0.1.0"

"""amzft: resumable LoRA/QLoRA fine-tuning of small instruction LLMs on AmazonTitles-1.3MM.

Heavy libraries (torch, transformers, lightning) are imported lazily by the modules that need
them, so ``import amzft`` and ``python -m amzft --help`` stay fast.
"""

__version__ = "0.1.0"

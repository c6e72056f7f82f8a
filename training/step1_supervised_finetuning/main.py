"""DeepSpeed-Chat's step-1 folder: `deepspeed main.py ...` here runs chatrlhf's step 1, chatrlhf.training.step1_sft.

Launch glue under DeepSpeed-Chat's path (not a package, not installed); docs/FROM_DSCHAT.md.
"""
from chatrlhf.training.step1_sft.main import cli

if __name__ == "__main__":
    cli()

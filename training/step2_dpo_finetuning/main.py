"""DeepSpeed-Chat's DPO folder: `deepspeed main.py ...` here runs chatrlhf's DPO step, chatrlhf.training.step2_dpo.

Launch glue under DeepSpeed-Chat's path (not a package, not installed); docs/FROM_DSCHAT.md.
"""
from chatrlhf.training.step2_dpo.main import cli

if __name__ == "__main__":
    cli()

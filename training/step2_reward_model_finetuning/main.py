"""DeepSpeed-Chat's step-2 folder: `deepspeed main.py ...` here runs chatrlhf's reward model step,
chatrlhf.training.step2_reward.

Launch glue under DeepSpeed-Chat's path (not a package, not installed); docs/FROM_DSCHAT.md.
"""
from chatrlhf.training.step2_reward.main import cli

if __name__ == "__main__":
    cli()

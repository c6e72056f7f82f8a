"""DeepSpeed-Chat's step-3 folder: `deepspeed main.py ...` here runs chatrlhf's PPO step, chatrlhf.training.step3_ppo.

Launch glue under DeepSpeed-Chat's path (not a package, not installed); docs/FROM_DSCHAT.md.
"""
from chatrlhf.training.step3_ppo.main import cli

if __name__ == "__main__":
    cli()

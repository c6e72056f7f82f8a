"""DeepSpeed-Chat's e2e_rlhf.py: chatrlhf's pipeline (train.py) with DeepSpeed-Chat's defaults, so that its command
lines run unchanged: `python e2e_rlhf.py` trains facebook/opt-1.3b with a facebook/opt-350m reward model on one GPU,
as there. Outputs go to <output-dir>/step1_sft, step2_reward, step3_ppo; docs/FROM_DSCHAT.md."""
import sys

from chatrlhf.training.pipeline.cli import e2e_argv, main

raise SystemExit(main(e2e_argv(sys.argv[1:])))

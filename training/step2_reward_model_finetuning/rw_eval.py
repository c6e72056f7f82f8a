"""DeepSpeed-Chat's step-2 rw_eval.py: runs chatrlhf.training.step2_reward.rw_eval (the same flags; with only
--model_name_or_path it scores built-in answer pairs, as DeepSpeed-Chat's does).

Launch glue under DeepSpeed-Chat's path (not a package, not installed); docs/FROM_DSCHAT.md.
"""
from chatrlhf.training.step2_reward.rw_eval import main

if __name__ == "__main__":
    main()

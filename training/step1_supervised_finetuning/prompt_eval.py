"""DeepSpeed-Chat's step-1 prompt_eval.py: runs chatrlhf.inference.prompt_eval (the same flags).

Launch glue under DeepSpeed-Chat's path (not a package, not installed); docs/FROM_DSCHAT.md.
"""
from chatrlhf.inference.prompt_eval import main

if __name__ == "__main__":
    main()

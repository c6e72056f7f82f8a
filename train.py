"""All three steps in one command: `python train.py --help` (also installed as `chatrlhf-train`)."""
from chatrlhf.training.pipeline.cli import main

raise SystemExit(main())

from chatrlhf.training.pipeline.cli import main

raise SystemExit(main())

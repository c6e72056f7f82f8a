from chatrlhf.training.step2_dpo.main import cli

cli()

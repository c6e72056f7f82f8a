from chatrlhf.training.step1_sft.main import cli

cli()

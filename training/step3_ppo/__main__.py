from chatrlhf.training.step3_ppo.main import cli

cli()

from chatrlhf.training.step2_reward.main import cli

cli()

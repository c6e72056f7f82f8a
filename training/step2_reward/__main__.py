from chatrlhf.training.step2_reward.main import main

main()

from chatrlhf.training.data.pipeline import PhaseData, load_phase_data  # noqa: F401  the steps' one entry point

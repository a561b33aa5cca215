"""A training run: its plan, the trainer loop, resume and checkpoints (integrity apart), the workdir lock, signals, logs, the report and result files."""

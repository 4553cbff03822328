"""Training-side code: the official losses of stages 1, 2 and 3-5, reproduced for parity and fine-tuning."""

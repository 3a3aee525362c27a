"""Training: configs and recipes, losses, the compute-budget controller, optimizer and schedules, growth,
determinism, and the loop (`train()`). Imports model/, distributed/, checkpoint/, config, presets, tokenizer,
data, device and files; never infer/ or serve/."""

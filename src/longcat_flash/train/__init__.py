"""Training: configs and recipes, losses, the compute-budget controller, optimizer and schedules, growth,
determinism, and the loop (`train()`). Imports model/, checkpoint/, config, presets, tokenizer and data; never
infer/ or serve/."""

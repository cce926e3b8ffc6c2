"""Training EAGLE-3 draft heads by self-distillation from a target, and `etspec-train-head`.

This stage owns the offline prompt sources (`prompts`), the self-distilled data (`data`: the target's
responses, its taps and next-token distributions), the draft vocabulary (`vocab`), the training-time-test
forward and loss (`ttt`), the optimisation loop (`trainer`), the head's config and checkpoint writer
(`head`), acceptance on held-out prompts (`evaluate`) and the CLI (`cli`).

It may import `etspec.models` and third-party libraries (torch, safetensors, transformers, tqdm) only;
no other stage imports it. Its output is a standard EAGLE-3 checkpoint directory, the same input
etspec-export takes from any other trainer.
"""

"""Training EAGLE-3 draft heads by self-distillation from a target."""

"""The settings of an explanation (no TensorFlow here: `--help` answers at once)."""

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
BASELINES = ("pad", "mask", "zeros")  # what replaces the tokens at the baseline
OUTPUTS = ("probability", "logit")  # what F is
METHODS = ("integrated_gradients", "gradient_x_input", "attention_rollout")  # each one has all

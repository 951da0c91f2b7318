"""The learner's settings as plain data: `LearnerConfig` and its `LossWeights`.

Kept apart from the learner and the losses (which re-export both) so that reading them imports no torch:
the command line takes its flags' defaults from these fields (one source per default), and building the
parser must stay fast (`cli/main.py`). The templates' default is read from `factory.tokens.prompts` when a
config is built, since importing the `factory.tokens` package loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from factory.errors import ConfigError


@dataclass
class LossWeights:
    """``λ`` of each term; 0 disables a term and skips its forward pass entirely."""

    ti: float = 1.0  # textual inversion (generative)
    ce: float = 1.0  # text-side CLIP cross-entropy against the parent's negative bank
    image_ce: float = 0.0  # image-side CE: each image classified among the tokens learned together
    reg: float = 0.0  # ‖v − e_p‖²: stay near the parent word
    # Calibrate λ_TI per concept by measurement (0: λ_TI is ``ti`` as given). At the start, on fresh
    # samples, the learner measures the gradient each term sends to the concept's parameters and sets
    # λ_TI,c = ti · ti_balance · ‖∇CE_c‖ / ‖∇TI_c‖: the TI term pulls ``ti_balance`` times as hard as the
    # CE terms. The raw denoising MSE's gradient is two orders of magnitude below CE's (its loss sits
    # near the noise floor), so an uncalibrated λ_TI = 1 leaves the token CE-only; and the ratio differs
    # by backbone, so no fixed λ carries from one to another. Default 0.5: chosen by
    # benchmarks/objective_sweep.py on world seed 0 (rule fixed before it ran: the highest fidelity + colour
    # among settings within 0.02 of CE-only's accuracy); README "The objective" has the sweep.
    ti_balance: float = 0.5


def _default_templates() -> tuple[str, ...]:
    from factory.tokens.prompts import DEFAULT_TEMPLATES

    return DEFAULT_TEMPLATES


@dataclass
class LearnerConfig:
    steps: int = 200
    lr: float = 0.01
    weights: LossWeights = field(default_factory=LossWeights)
    parametrization: str = "projected"  # or "free" (the ablation)
    templates: tuple[str, ...] = field(default_factory=_default_templates)  # factory.tokens.prompts.DEFAULT_TEMPLATES
    ti_samples: int = 2  # TI (latent, noise, t) samples per concept per step
    # Templates encoded per concept per step, sampled from the concept's own generator (0: all of them).
    # The text encoder runs on C × this many prompts instead of C × T: the CE terms see a fresh subset
    # each step (as the diffusers TI example samples one template per image) at 1/T of the cost.
    templates_per_step: int = 0
    # TI samples per concept that measure its gradient when λ_TI is calibrated (`LossWeights.ti_balance`),
    # once, before the first step. One draw is too noisy; with few steps (early stopping) and one TI sample
    # per step, 8 of them are a large share of a concept's UNet work, hence a setting.
    calibration_samples: int = 8
    patience: int = 0  # early stopping: steps without improvement of the loss EMA; 0 disables
    min_delta: float = 1e-4
    ema: float = 0.9  # smoothing of the per-concept loss used for early stopping and reported losses
    seed: int = 0
    vocabulary: str | None = None  # attribute vocabulary name; None: chosen by parent word
    rank_tol: float = 1e-4
    log_every: int = 50
    # Memory (a GPU at production size): the TI term's UNet samples in micro-batches of this many, each
    # backpropagated to the text states on its own (0: all C × ti_samples in one call; the token is the
    # same either way; "auto": on a GPU the largest that fits its free memory, `factory.memory`), and
    # UNet gradient checkpointing (recompute activations in the backward pass).
    ti_micro_batch: int | str = 0
    gradient_checkpointing: bool = False
    # Bound each token's norm to this multiple of the vocabulary's mean word norm (0: unbounded). A token
    # far longer than any word dominates every prompt it is in, which is what breaks composition.
    max_norm_ratio: float = 0.0

    def __post_init__(self):
        # ConfigError (a ValueError too): the CLI prints a rejected flag's value as one line and exits 2.
        if self.parametrization not in ("projected", "free"):
            raise ConfigError(f"parametrization must be 'projected' or 'free', got {self.parametrization!r}")
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        self.templates = tuple(self.templates)
        if isinstance(self.ti_micro_batch, str) and self.ti_micro_batch.isdigit():
            self.ti_micro_batch = int(self.ti_micro_batch)
        if self.ti_micro_batch != "auto" and (not isinstance(self.ti_micro_batch, int) or self.ti_micro_batch < 0):
            raise ConfigError(
                f"ti_micro_batch must be an integer >= 0 (0: one batch) or 'auto', got {self.ti_micro_batch!r}"
            )
        if not 0 <= self.templates_per_step <= len(self.templates):
            raise ConfigError(
                f"templates_per_step must be in [0, {len(self.templates)}] (0: all), got {self.templates_per_step}"
            )
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.max_norm_ratio < 0:
            raise ConfigError(f"max_norm_ratio must be >= 0 (0: unbounded), got {self.max_norm_ratio}")


__all__ = ["LearnerConfig", "LossWeights"]

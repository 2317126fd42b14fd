"""The ablation suites: which factor each varies, on what base, with what budget.

A suite is a set of *arms* that differ in one factor of a base config, each
trained with the same budget for every seed in ``seeds`` and evaluated with one
protocol (sampler, steps, number of samples, reference split, feature network).
The ``sampling`` kind trains nothing: its arms are sampler settings applied to
the models of another suite's arm, so its spread is over those models' seeds.

Sizes: every suite has a ``cpu`` budget (≤ 30 min on a quiet 2-core CPU) and a
``full`` budget (the same configs trained ~100x longer, with more samples, for a
GPU/TPU). The factor and the evaluation protocol do not change with the scale.

Run identity: a run is (base, arm name, arm overrides, budget, seed). Two suites
that name the same arm of the same base share the run (e.g. the multiscale
suite's "off" arm is the resolution-shift suite's ``shift32`` arm).
"""

import dataclasses
from typing import Any, Callable

import ml_collections

from simple_diffusion import recipes
from simple_diffusion import samplers
from simple_diffusion.models import presets

SCALES = ("cpu", "full")

@dataclasses.dataclass(frozen=True)
class Budget:
    """Training and evaluation size of every run of a suite at one scale.

    Attributes:
      train_steps: optimizer steps per run.
      batch_size: global batch.
      num_samples: generated images per evaluation (against ``num_reference``
        test images).
      num_reference: reference (test split) images.
      eval_every: training steps between evaluations (the metric-vs-steps
        curve); the final step is always evaluated.
    """
    train_steps: int
    batch_size: int
    num_samples: int
    num_reference: int
    eval_every: int

@dataclasses.dataclass(frozen=True)
class Arm:
    """One level of the suite's factor.

    Attributes:
      name: short id, unique within its base (run directories use it).
      label: the table's description of the arm.
      overrides: dotted config keys -> values applied to the base config
        (training suites), or SamplerOptions fields (the sampling suite).
    """
    name: str
    label: str
    overrides: dict[str, Any]

@dataclasses.dataclass(frozen=True)
class Suite:
    """A named ablation (see the module docstring).

    Attributes:
      name: the ``--suite`` value.
      title: the table heading.
      claim: what the paper reports, with its section/table.
      expected_best: the arm the paper's direction predicts to score best
        (lowest Fréchet distance); None if the paper states no direction.
      caveat: why the small-scale result might differ from the paper's.
      base: base-config name (a key of ``BASES``).
      arms: the factor's levels; the first is the reference arm of the table.
      budgets: scale -> Budget.
      protocol: the evaluation sampler (every arm of a training suite).
      seeds: training seeds per arm.
      source: for the sampling suite, (suite name, arm name) whose trained
        models are sampled.
    """
    name: str
    title: str
    claim: str
    expected_best: str | None
    caveat: str
    base: str
    arms: tuple[Arm, ...]
    budgets: dict[str, Budget]
    protocol: samplers.SamplerOptions
    seeds: tuple[int, ...] = (0, 1)
    source: tuple[str, str] | None = None

    @property
    def kind(self) -> str:
        return "sampling" if self.source else "training"

def _fashion_mnist(image_size: int, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The simple-diffusion recipe on Fashion-MNIST at ``image_size`` (the demo's
    data, optimizer and EMA; the caller's model). Fashion-MNIST's 28x28 images
    are enlarged bicubically (PIL) to ``image_size``, so at 128 px the images are
    smooth and redundant: the regime in which the paper says the unshifted
    schedule destroys too little information at each noise level."""
    c = recipes.fashion_mnist(recipes.simple_diffusion_imagenet(64), "demo")
    c.model = model
    c.model.image_size = image_size
    c.schedule.name = "cosine"
    c.schedule.image_d = image_size
    c.ema_decays = (0.995,)  # [project] Budgets of hundreds of steps: a short EMA.
    c.eval.feature = "effnet_lite0"
    c.eval.reference_split = "test"
    c.sample.num_images = 40
    c.log_every_steps = 25
    return c

def _base_demo32() -> ml_collections.ConfigDict:
    """32x32: the demo's residual U-ViT (patch 2, a 16x16 conv level, 8x8 transformer)."""
    return _fashion_mnist(32, presets.get_preset("demo"))

def _base_uvit128() -> ml_collections.ConfigDict:
    """128x128: the demo U-ViT with a patch-4 stem and two conv levels (32x32 with 24
    channels, 16x16 with 48), so its transformer runs at 8x8. The stem must be able to
    carry every pixel: a 4x4x1 patch is 16 values into 24 channels. (A patch-8 stem into
    48 channels, tried first, cannot represent per-pixel noise, so its samples kept
    the last steps' grain whatever the schedule.)"""
    model = presets.get_preset("demo")
    model.patch_size = 4
    model.channels = (24, 48)
    model.num_res_blocks = (1, 1)
    return _fashion_mnist(128, model)

BASES: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "demo32": _base_demo32,
    "uvit128": _base_uvit128,
}

_EVAL_DDPM_32 = samplers.SamplerOptions(sampler="ddpm", num_steps=32)

_SHIFT_ARMS = (
    Arm("cosine", "cosine, unshifted", {"schedule.name": "cosine"}),
    Arm("shift32", "cosine shifted to reference 32 (SNR × (32/128)²)",
        {"schedule.name": "cosine_shifted", "schedule.noise_d": 32}),
    Arm("shift64", "cosine shifted to reference 64 (SNR × (64/128)²)",
        {"schedule.name": "cosine_shifted", "schedule.noise_d": 64}),
    Arm("interp32_256", "interpolated: shifted 32 at high noise → 256 at low noise",
        {"schedule.name": "cosine_interpolated", "schedule.noise_d_low": 32,
         "schedule.noise_d_high": 256}),
)

_BUDGET_128 = {
    # One evaluation, at the end: at 128 px a 500-sample evaluation costs ~1 min here.
    "cpu": Budget(train_steps=500, batch_size=32, num_samples=500, num_reference=2000,
                  eval_every=500),
    "full": Budget(train_steps=60_000, batch_size=128, num_samples=10_000,
                   num_reference=10_000, eval_every=10_000),
}
_BUDGET_32 = {
    "cpu": Budget(train_steps=400, batch_size=64, num_samples=500, num_reference=2000,
                  eval_every=200),
    "full": Budget(train_steps=60_000, batch_size=256, num_samples=10_000,
                   num_reference=10_000, eval_every=10_000),
}

# U-Net width chosen by counting: `python -m simple_diffusion.benchmark flops` style counts
# (simple_diffusion.flops) give 166 MFLOP per image (forward + backward) for the residual
# demo U-ViT, 182 for its skip variant, 207 for this U-Net with base 12 channels (95 with 8,
# 361 with 16). The table prints the counted FLOPs of every arm.
_UNET_MATCHED = {"model": dict(presets.get_preset("unet_demo").to_dict(), base_channels=12)}

def _nfe_arms() -> tuple[Arm, ...]:
    """DDPM, DDIM and Heun at 8/16/32/64 model evaluations per sample, and DDPM with
    guidance (w = 1) everywhere or in the SiD2 interval, at matched evaluations
    (a guided step costs 2; the interval's step count is the largest that fits)."""
    arms = []
    for nfe in (8, 16, 32, 64):
        arms.append(Arm(f"ddpm_{nfe}", f"DDPM ancestral, {nfe} steps", dict(
            sampler="ddpm", num_steps=nfe, target_nfe=nfe)))
        arms.append(Arm(f"ddim_{nfe}", f"DDIM (η = 0), {nfe} steps", dict(
            sampler="ddim", num_steps=nfe, target_nfe=nfe)))
        arms.append(Arm(f"heun_{nfe}", f"Heun (EDM grid on the trained λ range), "
                        f"{(nfe + 1) // 2} steps", dict(
                            sampler="heun", num_steps=(nfe + 1) // 2, target_nfe=nfe)))
    for nfe in (16, 32, 64):
        arms.append(Arm(f"ddpm_cfg_{nfe}", f"DDPM, guidance w = 1 everywhere, {nfe // 2} steps",
                        dict(sampler="ddpm", num_steps=nfe // 2, guidance_scale=1.0,
                             target_nfe=nfe)))
        low, high = recipes.GUIDANCE_INTERVAL_LOGSNR
        arms.append(Arm(f"ddpm_cfg_interval_{nfe}",
                        f"DDPM, guidance w = 1 for λ ∈ [{low:.2f}, {high:.2f}]", dict(
                            sampler="ddpm", num_steps=None, guidance_scale=1.0,
                            guidance_logsnr_min=low, guidance_logsnr_max=high,
                            target_nfe=nfe)))
    return tuple(arms)

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite(
        name="shift128",
        title="Resolution shift of the noise schedule at 128×128",
        claim="Simple diffusion §3.1 / Table 2: at high resolution the unshifted cosine "
              "schedule is worse; shifting the SNR by (64/d)² (or interpolating shifts) "
              "improves FID.",
        expected_best="shift64",
        caveat="Fashion-MNIST enlarged from 28 px has almost no detail at 128 px, the "
               "models are tiny and trained for minutes, so both under-fitting and the "
               "evaluation's noise can hide or flip small schedule effects.",
        base="uvit128", arms=_SHIFT_ARMS, budgets=_BUDGET_128, protocol=_EVAL_DDPM_32),
    Suite(
        name="multiscale128",
        title="Multiscale loss at 128×128 (schedule shifted to 32)",
        claim="Simple diffusion §3.2 / Table 6: the multiscale loss (down to 32×32) improves "
              "FID at 256 and 512 but slightly hurts at lower resolutions.",
        expected_best=None,
        caveat="The paper measures after full training, where the multiscale loss helps "
               "only from 256 px up; after 500 steps the extra low-resolution terms may "
               "mostly speed up learning the coarse structure, which is nearly all of what "
               "Fashion-MNIST upsampled to 128 px holds.",
        base="uvit128",
        arms=(_SHIFT_ARMS[1],
              Arm("shift32_multiscale", "shifted to 32, multiscale loss 128→64→32",
                  {"schedule.name": "cosine_shifted", "schedule.noise_d": 32,
                   "loss.multiscale_min_res": 32})),
        budgets=_BUDGET_128, protocol=_EVAL_DDPM_32),
    Suite(
        name="weighting",
        title="Loss weighting on a v-prediction network (32×32)",
        claim="SiD2 §3: the sigmoid weighting w = σ(b − λ) beats simple diffusion's "
              "ε-MSE; v-MSE (= (1 + SNR)-weighted ε-MSE) is the usual alternative.",
        expected_best="sigmoid",
        caveat="SiD2's gain is measured on ImageNet at 512 px after hundreds of thousands "
               "of steps, and its bias b = −3 (at reference 64) is this project's reading.",
        base="demo32",
        arms=(Arm("eps_mse", "ε-MSE (simple diffusion)", {"loss.weighting": "eps_mse"}),
              Arm("sigmoid", "sigmoid, b = −3 at reference 64 (SiD2)", {
                  "loss.weighting": "sigmoid", "loss.sigmoid_bias": -3.0,
                  "loss.sigmoid_bias_ref_d": 64}),
              Arm("v_mse", "v-MSE", {"loss.weighting": "v_mse"})),
        budgets=_BUDGET_32, protocol=_EVAL_DDPM_32),
    Suite(
        name="architecture",
        title="Architecture at matched training FLOPs (32×32)",
        claim="Simple diffusion §3.4: the U-ViT (conv levels + a transformer at low "
              "resolution) trains well; SiD2 §3: residual U-ViT skips (one per resolution "
              "change) instead of U-Net skip concatenation.",
        expected_best=None,
        caveat="The papers compare at ImageNet scale, not against a FLOP-matched DDPM "
               "U-Net; on a CPU the U-Net's convolutions also run at a lower FLOP rate, so "
               "equal FLOPs is not equal wall time.",
        base="demo32",
        # The demo32 base is already the residual U-ViT trained with eps-MSE, so this arm
        # is the weighting suite's eps_mse run (same name and overrides: shared, not retrained).
        arms=(Arm("eps_mse", "U-ViT, residual skips (SiD2): the weighting suite's ε-MSE runs",
                  {"loss.weighting": "eps_mse"}),
              Arm("uvit_skips", "U-ViT, U-Net skip concatenation", {"model.residual": False}),
              Arm("unet", "DDPM U-Net, base 12 channels (FLOP-matched)", _UNET_MATCHED)),
        budgets=_BUDGET_32, protocol=_EVAL_DDPM_32),
    Suite(
        name="sampling",
        title="Samplers at matched model evaluations (32×32, the weighting suite's ε-MSE models)",
        claim="DDIM and second-order ODE solvers (EDM's Heun) need fewer network "
              "evaluations than DDPM ancestral sampling; guidance limited to an interval "
              "(SiD2, Kynkäänniemi et al.) is cheaper and at least as good as guidance "
              "everywhere.",
        expected_best=None,
        caveat="Fréchet distance on EfficientNet-Lite0 features of 500 samples, and "
               "guidance trades diversity for class fidelity, which this distance penalises.",
        base="demo32", arms=_nfe_arms(), budgets=_BUDGET_32, protocol=_EVAL_DDPM_32,
        source=("weighting", "eps_mse")),
)}

def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; use one of {sorted(SUITES)}.")
    return SUITES[name]

def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted keys (``"schedule.noise_d"``) or whole sections (``"model"``)."""
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        section = config
        for part in path:
            section = section[part]
        if isinstance(value, dict):
            section[leaf] = ml_collections.ConfigDict(value)
        else:
            section[leaf] = value

def run_config(suite: Suite, arm: Arm, seed: int, scale: str) -> ml_collections.ConfigDict:
    """The full training config of one run of a training suite."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {SCALES}.")
    budget = suite.budgets[scale]
    c = BASES[suite.base]()
    apply_overrides(c, arm.overrides)
    c.seed = seed
    c.num_train_steps = budget.train_steps
    c.batch_size = budget.batch_size
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, budget.train_steps // 10)
    c.checkpoint_every_steps = budget.eval_every or budget.train_steps
    c.keep_checkpoints = 2
    c.sample.every_steps = budget.train_steps  # One grid, of the final model.
    c.sample.guidance_scale = 0.0
    c.eval.every_steps = budget.eval_every
    c.eval.num_samples = budget.num_samples
    c.eval.num_reference = budget.num_reference
    c.eval.batch_size = min(250 if scale == "cpu" else 1000, budget.num_samples)
    c.eval.seed = 1234  # The same noise for every arm and seed: paired comparisons.
    for key, value in dataclasses.asdict(suite.protocol).items():
        c.eval[key] = value
    return c

def sampler_options(arm: Arm, grid_fn: Callable[[samplers.SamplerOptions], Any]
                    ) -> samplers.SamplerOptions:
    """The SamplerOptions of a sampling-suite arm; ``num_steps=None`` is resolved to the
    largest step count whose model evaluations (``grid_fn(options)`` -> logSNR grid)
    fit ``target_nfe``."""
    fields = {k: v for k, v in arm.overrides.items() if k != "target_nfe"}
    target = arm.overrides["target_nfe"]
    if fields.get("num_steps") is not None:
        return samplers.SamplerOptions(**fields)
    best = None
    # A step costs 1 or 2 evaluations and the count grows with the steps: start at the
    # fewest steps that could reach the target and stop at the first that exceeds it.
    for steps in range(max(1, target // 2), target + 1):
        options = samplers.SamplerOptions(**{**fields, "num_steps": steps})
        if samplers.num_model_evaluations(options, grid_fn(options)) > target:
            break
        best = options
    if best is None:
        raise ValueError(f"arm {arm.name}: no step count fits {target} evaluations.")
    return best


def describe_budget(budget: Budget) -> str:
    images = budget.train_steps * budget.batch_size
    return (f"{budget.train_steps} steps × batch {budget.batch_size} "
            f"({images / 1000:.1f}k images, {images / 60_000:.1f} epochs)")


"""The forward and reverse diffusion process as plain functions on tensors.

    schedule = NoiseSchedule.from_config(json.load(open("scheduler/scheduler_config.json")))
    x_t = q_sample(x0, noise, t, schedule)                                # training input
    target = training_target(x0, noise, t, schedule)                      # eps | v | x0
    x0 = ddim_sample(model, x_T, ddim_timesteps(10), schedule)            # model(x, t) -> prediction
    x0 = predict_x0(model, x_t, 999, schedule)                            # one network call

Notation (DDPM / DDIM): ᾱ_t = alphas_cumprod[t], x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε,
v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho). `t` is always a [B] integer tensor of per-sample
timesteps in [0, T). Tensors come first, then t, then the schedule, in diffusers' `add_noise(x0,
noise, t)` order; the schedule is always a `NoiseSchedule` (`schedule.to(device)` once, to keep
its ᾱ table beside the latents). `model` is any callable `model(x_t, t) -> prediction` in the schedule's
parameterisation; close over the conditioning (text context, concatenated image latent) there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_same_shape, describe

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "linspace", "trailing")
Model = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """ᾱ_t of a discrete DDPM schedule and the network's parameterisation.

    alphas_cumprod: [T] float32, ᾱ_t = Π_{s<=t} (1 − β_s), decreasing in (0, 1].
    prediction_type: "epsilon" (SD 1.x, 2.x-base), "v_prediction" (SD 2.x-768) or "sample" (x0).
    """

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self):
        a = self.alphas_cumprod
        if not isinstance(a, Tensor) or a.ndim != 1 or not a.is_floating_point() or len(a) == 0:
            raise TypeError(f"alphas_cumprod must be a non-empty 1-D float tensor [T], got {describe(a)}")
        if not ((a > 0).all() and (a <= 1).all() and (a[1:] <= a[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing with values in (0, 1]")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def to(self, device: Union[str, torch.device]) -> NoiseSchedule:
        """The same schedule with its ᾱ table on `device` (the functions below move it per call otherwise)."""
        return replace(self, alphas_cumprod=self.alphas_cumprod.to(device))

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """From a diffusers `scheduler/scheduler_config.json` dict (any scheduler class).

        Reads beta_schedule ("linear" | "scaled_linear"), beta_start, beta_end,
        num_train_timesteps and prediction_type, with diffusers' defaults for missing keys.
        Sampling-only keys (timestep_spacing, steps_offset, clip_sample, set_alpha_to_one, ...)
        are ignored: samplers here take those choices as arguments.
        """
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config has trained_betas: only 'linear' and 'scaled_linear' are supported")
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("scheduler config has rescale_betas_zero_snr=True: zero terminal SNR is not supported")
        start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
        steps = config.get("num_train_timesteps", 1000)
        if kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}: expected 'linear' or 'scaled_linear'")
        return cls(torch.cumprod(1.0 - betas, dim=0), config.get("prediction_type", "epsilon"))

    @classmethod
    def sd(cls, prediction_type: str = "epsilon") -> NoiseSchedule:
        """Stable Diffusion 1.x / 2.x: scaled_linear, β 0.00085 → 0.012, T = 1000."""
        sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
        return cls.from_config({**sd, "prediction_type": prediction_type})


def _check_timesteps(t: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor) or t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"t must be a 1-D integer tensor [B] of timesteps, got {describe(t)}")
    if like.ndim == 0 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t has {t.shape[0]} timesteps but the batch is {tuple(like.shape)}: expected t of shape [B]")


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1], broadcastable against `like` [B, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _coefficients(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(√ᾱ_t, √(1−ᾱ_t)), [B, 1, ..., 1] in the dtype of `like` (computed in the schedule's dtype)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule (e.g. NoiseSchedule(alphas_cumprod)), got {describe(schedule)}")
    _check_timesteps(t, like)
    a = _per_sample(schedule.alphas_cumprod.to(like.device)[t.to(like.device)], like)
    return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)


def q_sample(x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM eq. 4). x0, noise [B, ...], t [B] -> [B, ...] like x0."""
    check_same_shape(x0, noise, "x0", "noise")
    sa, s1a = _coefficients(schedule, t, x0)
    return sa * x0 + s1a * noise.to(x0.dtype)


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    sa, s1a = _coefficients(schedule, t, x_t)
    return (x_t - s1a * eps) / sa


def eps_from_x0(x_t: Tensor, x0: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t)."""
    sa, s1a = _coefficients(schedule, t, x_t)
    return (x_t - sa * x0) / s1a


def x0_from_v(x_t: Tensor, v: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v."""
    sa, s1a = _coefficients(schedule, t, x_t)
    return sa * x_t - s1a * v


def eps_from_v(x_t: Tensor, v: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """ε = √(1−ᾱ_t)·x_t + √ᾱ_t·v."""
    sa, s1a = _coefficients(schedule, t, x_t)
    return s1a * x_t + sa * v


def v_from_x0_eps(x0: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
    sa, s1a = _coefficients(schedule, t, x0)
    return sa * eps - s1a * x0


def training_target(x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """What the network regresses onto for x_t = q_sample(x0, noise, t, schedule): ε, v or x0."""
    check_same_shape(x0, noise, "x0", "noise")
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return v_from_x0_eps(x0, noise, t, schedule)
    return x0


def x0_and_eps(pred: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    """(x0, ε) implied by a network output `pred` [B, ...] at x_t, in the schedule's parameterisation."""
    check_same_shape(pred, x_t, "prediction", "x_t")
    if schedule.prediction_type == "epsilon":
        return x0_from_eps(x_t, pred, t, schedule), pred
    if schedule.prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, t, schedule), eps_from_v(x_t, pred, t, schedule)
    return pred, eps_from_x0(x_t, pred, t, schedule)


def _batch_timesteps(t: Union[int, Tensor], x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device) if isinstance(t, int) else t


def predict_x0(model: Model, x_t: Tensor, t: Union[int, Tensor], schedule: NoiseSchedule) -> Tensor:
    """One-step prediction: x0 from a single network call at timestep t (int or [B]).

    DiffewS' one-step image-to-mask and Lotus/E2E-FT-style deterministic prediction; for a
    model fine-tuned at t = T−1 this equals `ddim_sample` with 1 trailing step.
    """
    t = _batch_timesteps(t, x_t)
    return x0_and_eps(model(x_t, t), x_t, t, schedule)[0]


def ddim_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "trailing", steps_offset: int = 0
) -> Tensor:
    """Descending DDIM timesteps [num_steps] (int64), as diffusers' `DDIMScheduler.set_timesteps`.

    spacing (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Table 2):

        leading   t_i = i·⌊T/n⌋ + steps_offset     1 step -> t = steps_offset
        linspace  round(linspace(0, T−1, n))       1 step -> t = 0
        trailing  round(T − i·T/n) − 1             1 step -> t = T−1

    The "DDIM leading" issue: SD checkpoints ship steps_offset=1 and diffusers defaults to leading
    spacing, so few-step inference never visits the high-noise timesteps, and 1-step inference
    evaluates the network at t = 1 on pure noise. Marigold-style dense predictors fine-tuned at (or
    mainly near) t = T−1 then fail; use trailing, which starts at t = T−1 for every step count
    (Garcia et al., "Fine-tuning image-conditional diffusion models is easier than you think").
    diffusers' trailing uses a float `np.arange`, which for some n (e.g. 61 of T=1000) appends a
    spurious t = −1; we return exactly n timesteps, equal to diffusers' first n.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}] (num_train_timesteps), got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64)
    if spacing == "leading":
        t = (i * (num_train_timesteps // num_steps)).flip(0) + steps_offset
    elif spacing == "linspace":
        t = (i * ((num_train_timesteps - 1) / max(num_steps - 1, 1))).round().flip(0)
    else:
        # the step np.arange really takes, (start + step) − start: equal to diffusers for every n
        delta = (num_train_timesteps - num_train_timesteps / num_steps) - num_train_timesteps
        t = (num_train_timesteps + i * delta).round() - 1
    return t.long()


def ddim_step(x_t: Tensor, pred: Tensor, t: Tensor, t_prev: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x_{t_prev} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂ (DDIM eq. 12, η = 0); t_prev = −1 means ᾱ = 1.

    x_t, pred [B, ...]; t, t_prev [B]. Equals diffusers' `DDIMScheduler.step` (clip_sample=False)
    from t to t_prev = t − T//n, with set_alpha_to_one=True for the final step.
    """
    x0, eps = x0_and_eps(pred, x_t, t, schedule)
    _check_timesteps(t_prev, x_t)
    a = schedule.alphas_cumprod.to(x_t.device)
    a_prev = _per_sample(torch.where(t_prev >= 0, a[t_prev.clamp(min=0)], 1.0), x_t)
    return a_prev.sqrt().to(x_t.dtype) * x0 + (1 - a_prev).sqrt().to(x_t.dtype) * eps


def ddim_sample(model: Model, x: Tensor, timesteps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Deterministic DDIM (η = 0) from x at timesteps[0] down to a clean x0 [B, ...].

    timesteps: descending [n], e.g. `ddim_timesteps(n, spacing="trailing")`. Each step goes to
    the next listed timestep and the last one to ᾱ = 1, so the result is the final x0 estimate.
    (diffusers' DDIMScheduler instead jumps to t − T//n, which differs for linspace and for
    trailing when n does not divide T, and ends at ᾱ_0 when set_alpha_to_one=False.)
    """
    ts = timesteps.tolist()
    if timesteps.ndim != 1 or not ts or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be a non-empty strictly descending 1-D tensor, got {ts}")
    if ts[0] >= schedule.num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_train_timesteps}), got {ts[0]} .. {ts[-1]}")
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        tt = _batch_timesteps(t, x)
        x = ddim_step(x, model(x, tt), tt, torch.full_like(tt, t_prev), schedule)
    return x


def ddim_eta_step(x_t: Tensor, eps: Tensor, t: int, t_next: int, schedule: NoiseSchedule, eta: float, noise: Tensor) -> Tensor:
    """One generalised DDIM step (Song et al. 2021, eq. 12) from t to t_next, in either direction
    (t_next > t inverts), ε-parameterised, as DIFF's official inversion (`get_xt_next`):

        a = ᾱ_t, a' = ᾱ_t', a_skip = ᾱ_max(t,t') / ᾱ_min(t,t')
        x̂0 = (x_t − √(1−a)·ε) / √a,   c1 = η·√((1 − a_skip)(1 − a') / (1 − a)),   c2 = √max(1 − a' − c1², 1e-10)
        x_t' = √a'·x̂0 + c1·z + c2·ε                       z = noise ~ N(0, I), ignored where η = 0

    x_t, eps, noise [B, ...]; t, t_next ints (one step for the batch). Computed in float32 or wider,
    the coefficients in float64 where the schedule's table is: no host sync (a CUDA graph can hold it).
    """
    check_same_shape(x_t, eps, "x_t", "eps")
    a, a_next = (schedule.alphas_cumprod[s].double() for s in (t, t_next))
    a_skip = torch.minimum(a, a_next) / torch.maximum(a, a_next)
    c1 = eta * ((1 - a_skip) * (1 - a_next) / (1 - a)).sqrt()
    c2 = (1 - a_next - c1**2).clamp(min=1e-10).sqrt()
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x0 = (x_t.to(dtype) - (1 - a).sqrt() * eps.to(dtype)) / a.sqrt()
    out = a_next.sqrt() * x0 + c2 * eps.to(dtype)
    return out + c1 * noise.to(dtype) if eta else out


def ensemble_mean(run: Callable[[Tensor], Tensor], noise: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Test-time ensembling (DiGSeg): mean over E runs that differ only in their noise.

    noise: [E, B, ...], one draw per ensemble member. `run` maps noise stacked run-major along
    the batch, [k·B, ...], to outputs [k·B, ...] (tile conditioning with `cond.repeat(k, ...)`).
    All E runs go through one call unless `chunk_size` caps the runs per call; on
    torch.OutOfMemoryError the chunk is halved and retried. Returns the mean, [B, ...].
    """
    if noise.ndim < 2 or noise.shape[0] == 0:
        raise ValueError(f"noise must be [E, B, ...] (one draw per ensemble member), got shape {tuple(noise.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of runs per call or None, got {chunk_size}")
    members = noise.shape[0]
    chunk, done, total = chunk_size or members, 0, None
    while done < members:
        k = min(chunk, members - done)
        try:
            out = run(noise[done : done + k].flatten(0, 1))
        except torch.OutOfMemoryError:
            if k == 1:
                raise
            chunk = k // 2
            continue
        out = out.unflatten(0, (k, -1)).sum(0, dtype=torch.promote_types(out.dtype, torch.float32))
        total = out if total is None else total + out
        done += k
    return (total / members).to(out.dtype)


def multires_noise(
    like: Tensor,
    t: Optional[Tensor] = None,
    num_train_timesteps: int = 1000,
    strength: float = 0.9,
    levels: int = 10,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Multi-resolution Gaussian noise, optionally annealed with the timestep: Marigold's
    construction (prs-eth/Marigold `src/util/multi_res_noise.py`, strategy "original", strength
    0.9, annealed by t/T in its trainers), which DiGSeg's A.1 describes without a formula.

    like: [B, C, H, W], whose shape, dtype and device the noise takes.

        ε = ε_full + Σ_{i=0}^{levels−1} w^i · up(ε_i),    ε_full, ε_i ~ N(0, I)
        size_0 = (H, W),  size_i = max(1, ⌊size_{i−1} / r_i^i⌋),  r_i ~ U[2, 4) (one draw per level)
        ε ← ε / std(ε)                                          (one std over the whole batch)

    stopping after the first level with a side of 1; up() is bilinear to (H, W). w = s, or with
    per-sample t [B] annealed w = s·t/T, so the pyramid fades to white noise as t -> 0 (w^0 = 1
    even for w = 0). Draw order, one generator: ε_full, then per level r_i then ε_i (Marigold's
    order, so the same generator gives Marigold's noise). The sizes are random: keep this outside
    compiled code.

    Three differences to the construction this function had before (ours, 2026-11): (1) level
    sizes: Marigold divides the *current* size by r_i^i, so they shrink super-exponentially
    (64 -> 64 -> ~21 -> ~2 -> 1), where ours divided by a fresh r per level (64 -> ~21 -> ~7 -> ..);
    (2) level 0 is a second full-resolution draw with weight 1 (ours started at the first coarse
    level); (3) normalisation by the std of the whole batch (ours: each sample to unit mean
    square), so annealed samples of one batch keep their relative scale.
    """
    if like.ndim != 4 or not like.is_floating_point():
        raise ValueError(f"like must be a 4-D float latent [B, C, H, W], got {describe(like)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    b, c, h, w = like.shape
    dtype, device = torch.promote_types(like.dtype, torch.float32), like.device
    weight = torch.full((b, 1, 1, 1), float(strength), dtype=dtype, device=device)
    if t is not None:
        _check_timesteps(t, like)
        weight = weight * _per_sample(t.to(device, dtype), like) / num_train_timesteps
    noise = torch.randn(like.shape, generator=generator, dtype=dtype, device=device)
    for i in range(levels):
        r = torch.rand(1, generator=generator, dtype=torch.float32, device=device) * 2 + 2
        shrink = r**i  # float32 arithmetic, as Marigold's, so the sizes agree to the pixel
        h, w = max(1, int(h / shrink)), max(1, int(w / shrink))
        coarse = torch.randn(b, c, h, w, generator=generator, dtype=dtype, device=device)
        noise = noise + F.interpolate(coarse, size=like.shape[-2:], mode="bilinear", align_corners=False) * weight**i
        if h == 1 or w == 1:
            break
    scale = noise.std() if noise.numel() > 1 else noise.abs()  # a single element has no std
    return (noise / scale).to(like.dtype)

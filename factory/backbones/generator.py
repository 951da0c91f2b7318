"""The diffusion side of a backbone: a diffusers UNet2DConditionModel (+ optional VAE) and its scheduler.

The UNet is conditioned on the *same* text encoder's hidden states as the classifier uses, which is
what lets one learned token both classify and generate.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from factory.backbones.config import GeneratorConfig
from factory.errors import SamplingCancelled


def _scheduler(cls, config: dict):
    """``cls`` from a scheduler config of any kind (PNDM, DDIM, Euler…): the keys ``cls`` does not take
    (``skip_prk_steps``, ``set_alpha_to_one`` …) are dropped instead of crashing its constructor."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


class DiffusionGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, unet=None, vae=None):
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel

        # unet / vae: models already loaded with `from_pretrained`; else built (random) from the config.
        self.config = cfg
        self.unet = unet if unet is not None else UNet2DConditionModel(**cfg.unet)
        self.vae = vae if vae is not None else (AutoencoderKL(**cfg.vae) if cfg.vae is not None else None)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def image_size(self) -> int:
        """Pixel resolution of generated images (latent size times the VAE's downsampling)."""
        return self.config.image_size

    def noise_scheduler(self):
        """A fresh DDPM scheduler for training-time noising (the TI loss), on the configured schedule.

        For a pipeline folder the config is its own scheduler's (SD ships PNDM): DDPM takes the same
        betas, timesteps and prediction type from it, as diffusers' training examples do.
        """
        from diffusers import DDPMScheduler

        return _scheduler(DDPMScheduler, self.config.scheduler)

    def sampling_scheduler(self):
        """A DDIM scheduler with the same noise schedule (and the folder's own offsets), for sampling."""
        from diffusers import DDIMScheduler

        return _scheduler(DDIMScheduler, {**self.noise_scheduler().config, **self.config.scheduler})

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W] at `image_size` -> the UNet's input space.

        The VAE posterior's mean is used (not a sample), so precomputed latents are deterministic.
        Either way the result is on the device of what consumes it: the VAE's latents where the VAE is,
        a pixel-space generator's pixels (no VAE) on the UNet's device, since pretraining noises them
        there and feeds them to the UNet.
        """
        if self.vae is None:
            return images.to(self.unet.device)
        images = images.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(images).latent_dist.mean * self.config.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> images in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        latents = latents.to(self.vae.device, self.vae.dtype)
        return self.vae.decode(latents / self.config.latent_scale).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def initial_noise(self, n: int, seed: int = 0) -> torch.Tensor:
        """The starting latents ``[n, c, s, s]`` that ``sample`` draws for a seed (on the CPU)."""
        s = self.unet.config.sample_size
        return torch.randn(n, self.latent_channels, s, s, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        steps: int = 40,
        guidance: float = 4.0,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """DDIM sampling with classifier-free guidance; returns images in [-1, 1], [B, 3, H, W].

        ``cond`` [B, L, w] are the text hidden states of the prompts (tokens already injected), ``uncond``
        those of the empty prompt (broadcast over B) — the caller encodes both, so a generator never needs
        to know about tokens. ``guidance`` 1 (or ``uncond`` None) disables guidance. ``noise`` overrides
        the seed's starting latents (e.g. the same noise repeated, to compare conditionings image by image).
        ``should_stop`` is polled before every step: once it says True, sampling raises `SamplingCancelled`
        (a server sets it when the request timed out or its client went away, so no CPU is spent on an
        answer nobody will read).
        """
        sched = self.sampling_scheduler()
        sched.set_timesteps(steps)
        b = cond.shape[0]
        x = self.initial_noise(b, seed) if noise is None else noise
        if x.shape[0] != b:
            raise ValueError(f"noise has {x.shape[0]} rows for {b} prompts")
        x = x.to(cond.device) * sched.init_noise_sigma
        guided = uncond is not None and guidance != 1.0
        if guided:
            uncond = uncond.expand(b, -1, -1)
            context = torch.cat([uncond, cond])
        for t in sched.timesteps:
            if should_stop is not None and should_stop():
                raise SamplingCancelled(f"sampling stopped before step {int(t)}: the request was cancelled")
            if guided:
                eps_u, eps_c = self._eps(torch.cat([x, x]), t, context).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = self._eps(x, t, cond)
            x = sched.step(eps, t, x).prev_sample
        return self.decode(x)

    def _eps(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction in float32, whatever precision the UNet runs in."""
        dt = self.unet.dtype
        return self.unet(x.to(dt), t, encoder_hidden_states=context.to(dt)).sample.float()

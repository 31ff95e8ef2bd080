"""velodiff's trainer: the autoencoder stage and the text-to-image latent-diffusion stage.

One concept per module: ``ema`` (exponential moving average), ``checkpoint`` (safetensors-only run
state that resumes bit-exactly), ``loop`` (the shared training loop: warm-up, clipping, EMA, loss CSV,
time budget, checkpoints; the distillers use it too), ``objectives`` (noise schedule, targets, min-SNR
weighting), ``autoencoder`` (AutoencoderKL stage), ``trainer`` (UNet + text encoder stage), ``export``
(the diffusers folder). Every random draw of step ``s`` comes from a generator seeded by ``(seed, s)``, so
a run's result is a pure function of its config and step count, however often it was resumed.
"""

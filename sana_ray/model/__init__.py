"""Sana model components: loading, the tiny preset, prompt/latent encoders and the flow-matching loss.

Import the submodules directly (``sana_ray.model.tiny``, ``.loading``, ``.text``, ``.latents``,
``.flow``): this package imports nothing so that ``import sana_ray.model`` stays cheap.
"""

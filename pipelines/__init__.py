"""Drop-in diffusers pipelines that run a composition method inside the denoising loop."""

from .stable_diffusion import MultiLoraPipelineOutput, MultiLoraStableDiffusionPipeline
from .stable_diffusion_xl import MultiLoraStableDiffusionXLPipeline

__all__ = ["MultiLoraPipelineOutput", "MultiLoraStableDiffusionPipeline", "MultiLoraStableDiffusionXLPipeline"]

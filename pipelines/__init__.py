"""Drop-in diffusers pipelines that run a composition method inside the denoising loop."""

from .stable_diffusion import MultiLoraPipelineOutput, MultiLoraStableDiffusionPipeline

__all__ = ["MultiLoraPipelineOutput", "MultiLoraStableDiffusionPipeline"]

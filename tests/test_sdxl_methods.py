"""Every registered method on the tiny SDXL: the shared contract tests and each method's equivalences,
imported from the SD 1.x test modules and run here with the SDXL `pipe` and `loras` fixtures."""

import torch

from compose.deep_cache import deep_features, shallow_forward
from tests.sdxl_helpers import loras, pipe  # noqa: F401  (fixtures under the names the imported tests use)
from tests.test_clora import test_without_updates_and_masks_it_averages_base_and_composite  # noqa: F401
from tests.test_cmlora import (  # noqa: F401
    test_deep_cache_counts_full_and_shallow_passes,
    test_every_interval_one_with_equal_weights_is_composite,
)
from tests.test_composer import test_whole_image_box_equals_lora_in_cross_attention_kv_out_only  # noqa: F401
from tests.test_klora import (  # noqa: F401
    test_klora_of_a_lora_with_itself_is_that_lora_alone,
    test_time_is_the_step_index_of_each_run,
)
from tests.test_freefuse import (  # noqa: F401
    test_a_second_call_gives_what_a_fresh_one_gives as test_freefuse_second_call_is_a_fresh_one,
    test_bias_is_on_the_conditional_rows_inside_the_regions_only,
    test_masks_partition_the_latent_and_a_pixel_no_lora_owns_gets_the_base,
    test_one_lora_owning_every_pixel_without_bias_is_that_lora_alone,
)
from tests.test_loratorio import (  # noqa: F401
    test_one_lora_without_recentring_is_that_lora_and_recentring_pulls_toward_the_base,
    test_uniform_weights_without_recentring_equal_composite,
)
from tests.test_methods_shared import (  # noqa: F401
    test_bad_input_fails_before_any_unet_call,
    test_runs_and_leaves_pipeline_as_it_was,
    test_state_restored_when_the_loop_raises,
    test_unknown_option_named,
)
from tests.test_pipeline import (  # noqa: F401
    test_composite_batched_equals_sequential_passes,
    test_composite_is_the_mean_of_guided_single_lora_predictions,
    test_composite_with_one_lora_equals_that_lora,
    test_fused_merge_equals_merge_and_unfuses,
    test_num_images_and_non_square,
    test_state_restored_after_call_and_after_exception,
)
from tests.test_regional import test_one_whole_image_box_is_that_lora_alone  # noqa: F401
from tests.test_tara import test_masks_on_every_token_reproduce_merge  # noqa: F401


def test_shallow_pass_with_pooled_embeds_and_time_ids_is_the_full_pass(pipe):  # noqa: F811
    sample, embeds = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 64)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 8, 0, 64, 64]])
    added = {"text_embeds": torch.randn(2, 32), "time_ids": time_ids}
    with torch.no_grad():
        with deep_features(pipe.unet) as captured:
            full = pipe.unet(sample, torch.tensor(500), embeds, added_cond_kwargs=added).sample
        shallow = shallow_forward(pipe.unet, sample, torch.tensor(500), embeds, captured[0], added_cond_kwargs=added)
    assert torch.equal(shallow, full)

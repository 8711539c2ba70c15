"""Every registered method on the tiny SDXL: the shared contract tests and each method's equivalences,
imported from the SD 1.x test modules and run here with the SDXL `pipe` and `loras` fixtures."""

from tests.sdxl_helpers import loras, pipe  # noqa: F401  (fixtures under the names the imported tests use)
from tests.test_clora import test_without_updates_and_masks_it_averages_base_and_composite  # noqa: F401
from tests.test_cmlora import test_every_interval_one_with_equal_weights_is_composite  # noqa: F401
from tests.test_composer import test_whole_image_box_equals_lora_in_cross_attention_kv_out_only  # noqa: F401
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
from tests.test_tara import test_masks_on_every_token_reproduce_merge  # noqa: F401

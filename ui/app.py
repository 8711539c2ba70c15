"""The Gradio app: pick LoRAs from the library, set them up, choose a method, generate, compare.

One pipeline serves every visitor; the queue runs one generation at a time and the others wait.
"""

from __future__ import annotations

import inspect
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from compose.errors import ComposeError
from compose.methods import METHODS
from pipelines.generate import generate
from pipelines.recipe import save_png_with_recipe

from .examples import EXAMPLES, example_loras, example_options
from .form import LoraSettings, arrange, build_recipe, check_triggers, python_code, suggest_prompt, with_method
from .library import LoraLibrary
from .options import OptionField, option_fields, options_from_form, server_path_options
from .pictures import for_display, library_card, library_picture, mask_pictures, region_preview
from .previews import MAX_PREVIEWS_PER_SCAN, PreviewMaker

MAX_LORAS = 5
HISTORY = 12
COMPARED_BY_DEFAULT = 3  # the first registered methods are the cheap baselines
PIPELINE_QUEUE = "pipeline"  # generation and comparison share one worker: one pipeline, one call at a time
LIBRARY_POLL_SECONDS = 5  # how soon a page shows another visitor's upload or a new preview
# Toy-model images are a few dozen pixels: scaled up in the browser they must stay sharp squares, not blur.
CSS = "#library img, #output img, #compare-grid img, #masks img, #regions img { image-rendering: pixelated; }"


@dataclass
class LoraSlot:
    """The widgets of one selected LoRA (hidden while the slot is unused)."""

    group: gr.Group
    title: gr.Markdown
    weight: gr.Slider
    trigger: gr.Textbox
    concept: gr.Textbox
    use_region: gr.Checkbox
    box: tuple[gr.Number, gr.Number, gr.Number, gr.Number]

    @property
    def inputs(self) -> list:
        return [self.weight, self.trigger, self.concept, self.use_region, *self.box]

    def read(self, values: dict, name: str) -> LoraSettings:
        return LoraSettings(
            name=name,
            weight=values[self.weight],
            trigger=values[self.trigger] or "",
            concept=values[self.concept] or "",
            use_region=values[self.use_region],
            box=tuple(values[number] for number in self.box),
        )

    def show(self, settings: LoraSettings | None) -> list:
        """Updates for [group, title, *inputs]."""
        if settings is None:
            return [gr.update(visible=False), gr.skip(), *[gr.skip() for _ in self.inputs]]
        return [
            gr.update(visible=True),
            f"**{settings.name}**",
            settings.weight,
            settings.trigger,
            settings.concept,
            settings.use_region,
            *settings.box,
        ]


@dataclass
class MethodForm:
    group: gr.Group
    fields: list[OptionField]
    inputs: list


class ComposeApp:
    """Handlers and widgets of the app; `blocks` is the gr.Blocks to launch."""

    def __init__(
        self, pipe, library: LoraLibrary, model: str, output_dir: str | Path | None = None, *,
        server_options: dict[str, Any] | None = None, preview_dir: str | Path | None = None,
        preview_limit: int = MAX_PREVIEWS_PER_SCAN,
    ):  # fmt: skip
        """`server_options` sets the options that name server paths (e.g. profile_cache_dir) for every
        method that has them; `preview_dir` (None: no previews) caches the library's previews, at most
        `preview_limit` new ones per scan."""
        self.pipe = pipe
        self.library = library
        self.model = model
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="loracompose-ui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.server_options = dict(server_options or {})
        self.pipeline_lock = threading.Lock()  # visitors' generations and previews take turns on the one pipeline
        self.previews = None
        if preview_dir:
            self.previews = PreviewMaker(pipe, preview_dir, self.pipeline_lock, limit=preview_limit)
        self.default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.size_step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        self.blocks = self._build()
        self._request_previews()

    # ----- layout -----------------------------------------------------------------------------
    def _build(self) -> gr.Blocks:
        with gr.Blocks(title="loracompose") as blocks:
            gr.Markdown(
                f"## loracompose — compose several LoRAs in one image\n"
                f"Model: `{self.model}` ({self.default_size} px). Pick LoRAs, give each a weight, "
                "choose a composition method, generate."
            )
            with gr.Row():
                with gr.Column(scale=5):
                    self._build_prompt()
                with gr.Column(scale=1, min_width=200):
                    self.generate_button = gr.Button("Generate", variant="primary", size="lg", elem_id="generate")
                    self.seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                    self.randomize = gr.Checkbox(False, label="new seed each time")
            with gr.Row():
                with gr.Column(scale=3):
                    self._build_library()
                    self._build_loras()
                    self._build_method()
                    self._build_sampling()
                with gr.Column(scale=2):
                    self._build_outputs()
            self._wire(blocks)
        blocks.queue(max_size=64, default_concurrency_limit=1)
        return blocks

    def _build_library(self) -> None:
        with gr.Accordion("LoRA library", open=True):
            # each page keeps the names its gallery shows, so a click means the tile the visitor saw
            self.library_view = gr.State(self._library_view())
            self.library_timer = gr.Timer(LIBRARY_POLL_SECONDS)
            self.library_gallery = gr.Gallery(
                self._library_cards(), label="Click a LoRA to add it", columns=6, height=180, fit_columns=False,
                object_fit="contain", allow_preview=False, buttons=[], format="png", elem_id="library",
            )  # fmt: skip
            self.library_notes = gr.Markdown(self._library_notes())
            with gr.Row():
                self.upload = gr.UploadButton(
                    "Upload a .safetensors LoRA", file_types=[".safetensors"], size="sm", elem_id="upload"
                )
                self.refresh = gr.Button("Rescan folders", size="sm")

    def _build_loras(self) -> None:
        self.selection = gr.Dropdown(
            choices=list(self.library.entries), value=[], multiselect=True, max_choices=MAX_LORAS,
            label=f"LoRAs to compose (up to {MAX_LORAS})", elem_id="lora-select",
        )  # fmt: skip
        self.slot_names = gr.State([])
        self.slots: list[LoraSlot] = []
        for index in range(MAX_LORAS):
            with gr.Group(visible=False, elem_id=f"lora-{index}") as group:
                title = gr.Markdown()
                with gr.Row():
                    weight = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="weight", elem_id=f"weight-{index}", scale=2)
                    trigger = gr.Textbox(label="trigger word", elem_id=f"trigger-{index}")
                    concept = gr.Textbox(label="concept word", elem_id=f"concept-{index}")
                with gr.Row():
                    use_region = gr.Checkbox(
                        label="region", info="box for region methods", min_width=100, elem_id=f"region-{index}"
                    )
                    box = tuple(
                        gr.Number(value, label=side, minimum=0, maximum=1, step=0.05, min_width=70)
                        for side, value in zip(("top", "left", "bottom", "right"), (0.0, 0.0, 1.0, 1.0))
                    )
            self.slots.append(LoraSlot(group, title, weight, trigger, concept, use_region, box))
        self.region_picture = gr.Image(
            label="Regions", height=160, interactive=False, format="png", buttons=[], elem_id="regions"
        )

    def _build_method(self) -> None:
        names = list(METHODS)
        self.method = gr.Radio(names, value=names[0], label="Composition method", elem_id="method")
        self.method_help = gr.Markdown(_method_summary(names[0]))
        self.method_forms: dict[str, MethodForm] = {}
        for name, method in METHODS.items():
            fields = option_fields(method.options_class)
            with gr.Group(visible=name == names[0]) as group:
                inputs = {}
                main = [field for field in fields if not field.advanced]
                advanced = [field for field in fields if field.advanced]
                with gr.Row():
                    for field in main:
                        inputs[field.name] = _option_widget(name, field)
                if advanced:
                    with gr.Accordion(f"Advanced {name} options", open=False), gr.Row():
                        for field in advanced:
                            inputs[field.name] = _option_widget(name, field)
            self.method_forms[name] = MethodForm(group, fields, [inputs[field.name] for field in fields])

    def _build_prompt(self) -> None:
        self.prompt = gr.Textbox(
            label="Prompt", lines=2, elem_id="prompt", placeholder="filled in from the LoRAs' trigger words"
        )
        self.suggested_prompt = gr.State("")
        self.negative_prompt = gr.Textbox(label="Negative prompt", lines=1)
        with gr.Row():
            self.example_buttons = [
                gr.Button(
                    f"Example: {example.label}", size="sm", elem_id=f"example-{index}",
                    visible=example_loras(example, self.library) is not None,
                )  # fmt: skip
                for index, example in enumerate(EXAMPLES)
            ]

    def _build_sampling(self) -> None:
        with gr.Row():
            self.steps = gr.Slider(1, 100, 25, step=1, label="steps", elem_id="steps")
            self.guidance = gr.Slider(1.0, 15.0, 7.5, step=0.5, label="guidance")
        with gr.Row():
            smallest = max(self.size_step, self.default_size // 2 // self.size_step * self.size_step)
            limits = dict(minimum=smallest, maximum=2 * self.default_size, step=self.size_step)
            self.width = gr.Slider(value=self.default_size, label="width", **limits)
            self.height = gr.Slider(value=self.default_size, label="height", **limits)

    def _build_outputs(self) -> None:
        with gr.Tabs():
            with gr.Tab("Image"):
                self.gallery = gr.Gallery(
                    label="Images (newest first)", columns=2, format="png", object_fit="contain", elem_id="output"
                )
                self.status = gr.Markdown(elem_id="status")
                self.download = gr.DownloadButton("Download PNG with recipe", visible=False, elem_id="download")
                self.history = gr.State([])
            with gr.Tab("Compare methods"):
                self.compare_methods = gr.CheckboxGroup(
                    list(METHODS), value=list(METHODS)[:COMPARED_BY_DEFAULT], label="Methods (same seed, each with its options)"
                )
                self.show_maps = gr.Checkbox(False, label="show the masks that methods report (e.g. clora)")
                self.compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
                self.compare_gallery = gr.Gallery(
                    label="Same seed, one image per method", columns=3, format="png", elem_id="compare-grid"
                )
                self.map_gallery = gr.Gallery(label="Masks", columns=4, format="png", visible=False, elem_id="masks")
            with gr.Tab("Use it in Python"):
                self.code = gr.Code(
                    language="python", label="The pipeline call for these settings", lines=18, wrap_lines=True, elem_id="code"
                )

    # ----- events -----------------------------------------------------------------------------
    @property
    def form_inputs(self) -> set:
        """Every widget a request reads (a set: handlers receive {widget: value})."""
        widgets = {
            self.slot_names, self.prompt, self.negative_prompt, self.seed, self.randomize, self.steps,
            self.guidance, self.width, self.height, self.method,
        }  # fmt: skip
        for slot in self.slots:
            widgets.update(slot.inputs)
        for form in self.method_forms.values():
            widgets.update(form.inputs)
        return widgets

    @property
    def slot_outputs(self) -> list:
        return [w for slot in self.slots for w in (slot.group, slot.title, *slot.inputs)]

    def example_outputs(self, index: int) -> list:
        """What an example sets: the LoRAs and their slots, the prompt, the method and its options."""
        form = self.method_forms[EXAMPLES[index].method]
        prompt = [self.prompt, self.suggested_prompt]
        return [self.selection, *self.slot_outputs, self.slot_names, *prompt, self.method, *form.inputs]

    def _wire(self, blocks: gr.Blocks) -> None:
        """Light events run at once (no queue limit); generation and comparison wait their turn.

        The code and the region picture follow user edits (`.input`) and the handlers that change
        the form, not every programmatic `.change`, which would re-run them dozens of times.
        """
        light = dict(concurrency_limit=None, show_progress="hidden")
        # views of the whole form run one at a time in arrival order, so a late answer to an
        # earlier edit never overwrites the view of a later one
        code_view = dict(
            concurrency_id="code-view", concurrency_limit=1, trigger_mode="always_last", show_progress="hidden"
        )
        region_view = {**code_view, "concurrency_id": "region-view"}
        region_inputs = {self.slot_names, self.width, self.height, *[w for slot in self.slots for w in slot.inputs]}
        region_edits = [self.width, self.height, *[w for slot in self.slots for w in (slot.use_region, *slot.box)]]
        user_edits = [w for w in self.form_inputs if not isinstance(w, gr.State)]

        def follow_form(event) -> None:
            event.then(self.show_code, self.form_inputs, self.code, **code_view)
            event.then(self.draw_regions, region_inputs, self.region_picture, **region_view)

        gr.on([w.input for w in user_edits] + [blocks.load], self.show_code, self.form_inputs, self.code, **code_view)
        gr.on(
            [w.input for w in region_edits] + [blocks.load], self.draw_regions, region_inputs, self.region_picture,
            **region_view,
        )
        follow_form(
            self.selection.change(
                self.arrange_slots,
                {self.selection, self.slot_names, self.prompt, self.suggested_prompt, *region_inputs},
                [*self.slot_outputs, self.slot_names, self.prompt, self.suggested_prompt],
                **light,
            )
        )
        for index, button in enumerate(self.example_buttons):
            follow_form(button.click(partial(self.use_example, index), None, self.example_outputs(index), **light))
        self.library_gallery.select(
            self.add_from_library, [self.library_view, self.selection], [self.selection], **light
        )
        library_inputs = [self.library_view, self.selection]
        library_outputs = [
            self.library_gallery, self.library_notes, self.selection, self.library_view, *self.example_buttons,
        ]  # fmt: skip
        gr.on([blocks.load, self.library_timer.tick], self.sync_library, library_inputs, library_outputs, **light)
        self.upload.upload(self.add_upload, [self.upload, *library_inputs], library_outputs, concurrency_id="library")
        self.refresh.click(self.rescan, library_inputs, library_outputs, concurrency_id="library")
        self.method.change(
            self.show_method, [self.method], [self.method_help, *[f.group for f in self.method_forms.values()]], **light
        )
        pipeline = dict(concurrency_id=PIPELINE_QUEUE, concurrency_limit=1)
        follow_form(
            self.generate_button.click(
                self.generate, self.form_inputs | {self.history},
                [self.gallery, self.status, self.download, self.seed, self.history],
                show_progress_on=self.gallery, **pipeline,
            )  # fmt: skip
        )
        follow_form(
            self.compare_button.click(
                self.compare, self.form_inputs | {self.compare_methods, self.show_maps},
                [self.compare_gallery, self.map_gallery, self.seed], show_progress_on=self.compare_gallery, **pipeline,
            )  # fmt: skip
        )

    # ----- handlers ---------------------------------------------------------------------------
    def arrange_slots(self, values: dict) -> list:
        names = values[self.selection] or []
        previous = [slot.read(values, name) for slot, name in zip(self.slots, values[self.slot_names])]
        try:
            arranged = arrange(names, previous, self.library)
        except ComposeError as error:
            raise self._error(error) from error
        suggestion = suggest_prompt(arranged)
        prompt = values[self.prompt] or ""
        keep_prompt = prompt.strip() and prompt != values[self.suggested_prompt]
        return [*self._slot_updates(arranged), names, gr.skip() if keep_prompt else suggestion, suggestion]

    def use_example(self, index: int) -> list:
        """Fill the form from an example (its prompt is kept: the selection's suggestion differs from it)."""
        example = EXAMPLES[index]
        loras = example_loras(example, self.library)
        if loras is None:
            raise gr.Error("the LoRAs of this example are no longer in the library", print_exception=False)
        names = [lora.name for lora in loras]
        options = example_options(example, loras)
        fields = self.method_forms[example.method].fields
        option_values = [field.widget_value(options.get(field.name, field.default)) for field in fields]
        prompt = [example.prompt, suggest_prompt(loras)]
        return [names, *self._slot_updates(loras), names, *prompt, example.method, *option_values]

    def add_from_library(self, view: dict, selection: list[str], event: gr.SelectData) -> list[str]:
        name = view["names"][event.index]
        selection = list(selection or [])
        if name in selection:
            return gr.skip()
        if len(selection) >= MAX_LORAS:
            raise gr.Error(f"at most {MAX_LORAS} LoRAs at once; remove one first", print_exception=False)
        return selection + [name]

    def add_upload(self, uploaded: str, view: dict, selection: list[str]) -> list:
        client_name = Path(uploaded).name
        try:
            entry = self.library.add_upload(uploaded, client_name)
        except ComposeError as error:
            raise self._error(error) from error
        gr.Info(f"added LoRA '{entry.name}'")
        self._request_previews()
        return self._library_updates(view, selection)

    def rescan(self, view: dict, selection: list[str]) -> list:
        self.library.refresh()
        self._request_previews()
        return self._library_updates(view, selection)

    def sync_library(self, view: dict, selection: list[str]) -> list:
        """A page's library as the server has it now: other visitors' uploads, previews made since."""
        if view["version"] == self._library_version():
            return [gr.skip()] * (4 + len(self.example_buttons))
        return self._library_updates(view, selection)

    def show_method(self, method: str) -> list:
        return [_method_summary(method), *[gr.update(visible=name == method) for name in self.method_forms]]

    def draw_regions(self, values: dict) -> Image.Image:
        loras = [slot.read(values, name) for slot, name in zip(self.slots, values[self.slot_names])]
        return region_preview(loras, int(values[self.height]), int(values[self.width]))

    def show_code(self, values: dict) -> str:
        try:
            return python_code(self.recipe(values))
        except ComposeError as error:
            return f"# Not ready yet: {self.library.public_message(str(error))}\n"

    def generate(self, values: dict, progress=gr.Progress()) -> list:
        values = self._with_seed(values)
        recipe = self._checked_recipe(values)
        progress(0, desc="loading LoRAs")
        try:
            image, full, output, seconds = self._run(recipe, progress, "")
        except ComposeError as error:  # checks that need the loaded LoRAs (e.g. a method's own)
            raise self._error(error) from error
        path = save_png_with_recipe(image, self.output_dir / _file_name(recipe), full)
        caption = f"{recipe['method']} · seed {recipe['seed']}"
        history = [(for_display(image), caption), *values[self.history]][:HISTORY]
        status = (
            f"**{recipe['method']}**, seed {recipe['seed']}, {recipe['steps']} steps: {seconds:.1f} s, "
            f"{output.unet_calls} UNet calls ({output.unet_passes} passes)"
        )
        return [history, status, gr.update(value=str(path), visible=True), recipe["seed"], history]

    def compare(self, values: dict, progress=gr.Progress()) -> list:
        values = self._with_seed(values)
        methods = [name for name in METHODS if name in (values[self.compare_methods] or [])]
        if not methods:
            raise gr.Error("choose at least one method to compare", print_exception=False)
        base = self._checked_recipe(values)
        cells, masks = [], []
        for index, method in enumerate(methods):
            try:  # a method that cannot run with these inputs gets a captioned cell; the others still run
                recipe = with_method(base, method, self._options(values, method))
                image, _, output, seconds = self._run(recipe, progress, f"{index + 1}/{len(methods)} {method}: ")
            except ComposeError as error:
                cells.append((library_card("not run"), f"{method}: {self.library.public_message(str(error))}"))
                continue
            cells.append((for_display(image), f"{method} ({seconds:.1f} s)"))
            names = [lora["name"] for lora in recipe["loras"]]
            masks += [(picture, f"{method} {caption}") for picture, caption in mask_pictures(output.extras, names)]
        show_masks = values[self.show_maps] and bool(masks)
        return [cells, gr.update(value=masks if show_masks else None, visible=show_masks), base["seed"]]

    # ----- helpers ----------------------------------------------------------------------------
    def recipe(self, values: dict) -> dict[str, Any]:
        """The recipe of the current form (raises ComposeError on bad input)."""
        method = values[self.method]
        loras = [slot.read(values, name) for slot, name in zip(self.slots, values[self.slot_names])]
        return build_recipe(
            model=self.model,
            prompt=values[self.prompt] or "",
            negative_prompt=values[self.negative_prompt] or "",
            seed=values[self.seed] or 0,
            steps=values[self.steps],
            guidance=values[self.guidance],
            height=values[self.height],
            width=values[self.width],
            method=method,
            options=self._options(values, method),
            loras=loras,
            library=self.library,
        )

    def _options(self, values: dict, method: str) -> dict[str, Any]:
        form = self.method_forms[method]
        return options_from_form(method, form.fields, [values[widget] for widget in form.inputs])

    def _checked_recipe(self, values: dict) -> dict[str, Any]:
        try:
            recipe = self.recipe(values)
            check_triggers(self.pipe.tokenizer, recipe)
        except ComposeError as error:
            raise self._error(error) from error
        return recipe

    def _error(self, error: ComposeError) -> gr.Error:
        """The error as a visitor sees it: LoRAs by their library names, no server paths."""
        return gr.Error(self.library.public_message(str(error)), print_exception=False)

    def _with_seed(self, values: dict) -> dict:
        if values[self.randomize]:
            return {**values, self.seed: random.randrange(2**31)}
        return values

    def _run(self, recipe: dict[str, Any], progress: gr.Progress, label: str):
        """Run a recipe through `generate` with per-step progress; (image, full recipe, output, seconds).

        The server's own path options are added for the run only: the saved recipe has none of them.
        """
        steps = recipe["steps"]
        observed = StepReportingPipeline(self.pipe, lambda step: progress((step, steps), desc=f"{label}step"))
        server_paths = server_path_options(METHODS[recipe["method"]].options_class)
        options = {**recipe["options"], **{k: v for k, v in self.server_options.items() if k in server_paths}}
        with self.pipeline_lock:
            start = time.perf_counter()
            image, full = generate(observed, with_method(recipe, recipe["method"], options))
            seconds = time.perf_counter() - start
        full["options"] = {k: v for k, v in full.get("options", {}).items() if k not in server_paths}
        return image, full, observed.output, seconds

    def _library_cards(self) -> list[tuple[Image.Image, str]]:
        cards = []
        for entry in self.library.entries.values():
            path = self.previews.picture(entry) if self.previews else entry.preview
            picture = (library_picture(path) if path else None) or library_card(entry.name)
            caption = entry.name + (f" · {entry.trigger}" if entry.trigger else "")
            cards.append((picture, caption))
        return cards

    def _library_notes(self) -> str:
        count = len(self.library.entries)
        notes = [f"{count} LoRA{'s' if count != 1 else ''} in the library."]
        notes += [f"- skipped `{name}`: {reason}" for name, reason in self.library.skipped.items()]
        return "\n".join(notes)

    def _library_version(self) -> tuple[int, int]:
        return self.library.version, self.previews.version if self.previews else 0

    def _library_view(self) -> dict:
        return {"names": list(self.library.entries), "version": self._library_version()}

    def _library_updates(self, view: dict, selection: list[str]) -> list:
        """[gallery, notes, selection, view, *example buttons]; the selection changes only with the names."""
        new_view = self._library_view()
        kept = [name for name in selection or [] if name in self.library.entries]
        choices = gr.update(choices=new_view["names"], value=kept) if new_view["names"] != view["names"] else gr.skip()
        examples = [gr.update(visible=example_loras(example, self.library) is not None) for example in EXAMPLES]
        return [self._library_cards(), self._library_notes(), choices, new_view, *examples]

    def _slot_updates(self, loras: list[LoraSettings]) -> list:
        """Updates for every slot's [group, title, *inputs]: the first ones show `loras`, the rest hide."""
        shown = [*loras, *[None] * (len(self.slots) - len(loras))]
        return [update for slot, settings in zip(self.slots, shown) for update in slot.show(settings)]

    def _request_previews(self) -> None:
        if self.previews:
            self.previews.request(self.library.entries.values())


class StepReportingPipeline:
    """The pipeline with a step callback on every call, keeping the output (generate returns the image only)."""

    def __init__(self, pipe, on_step):
        self.pipe = pipe
        self.on_step = on_step
        self.output = None

    def __call__(self, *args, **kwargs):
        self.output = self.pipe(*args, callback_on_step_end=self._step, **kwargs)
        return self.output

    def _step(self, pipe, index, timestep, tensors):
        self.on_step(index + 1)
        return {}


def _option_widget(method: str, field: OptionField):
    common = dict(label=field.name, info=field.help or None, elem_id=f"option-{method}-{field.name}")
    value = field.widget_value()
    if field.kind == "bool":
        return gr.Checkbox(value, min_width=220, **common)
    if field.kind in ("int", "float") and field.optional:  # a Number box cannot be empty: None would read as 0
        return gr.Textbox(value, placeholder="empty: none", **common)
    if field.kind in ("int", "float"):
        return gr.Number(value, precision=0 if field.kind == "int" else None, **common)
    if field.kind == "choice":
        return gr.Dropdown(list(field.choices), value=value, **common)
    if field.kind == "json":
        return gr.Textbox(value, **{**common, "label": f"{field.name} (JSON)"})
    return gr.Textbox(value, **common)


def _method_summary(name: str) -> str:
    method = METHODS[name]
    doc = method.__dict__.get("__doc__") or sys.modules[method.__module__].__doc__ or ""
    return inspect.cleandoc(doc).split("\n\n")[0]


def _file_name(recipe: dict[str, Any]) -> str:
    return f"{recipe['method']}-seed{recipe['seed']}-{time.strftime('%H%M%S')}-{random.randrange(1000):03d}.png"


def build_app(pipe, library: LoraLibrary, model: str, output_dir: str | Path | None = None, **settings) -> gr.Blocks:
    """The app as a gr.Blocks, not launched (tests and `loracompose ui` launch it, with `css=CSS`).

    `settings`: ComposeApp's server_options, preview_dir and preview_limit.
    """
    return ComposeApp(pipe, library, model, output_dir, **settings).blocks

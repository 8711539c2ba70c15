"""The web UI without a browser: library and uploads, option forms, recipes, code, handlers."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image
import gradio as gr
from safetensors.torch import save_file

from compose.errors import (
    ComposeError,
    IncompatibleLoraError,
    InvalidOptionError,
    InvalidRegionError,
    NotSafetensorsError,
    TriggerNotInPromptError,
)
from compose.loading import file_sha256
from compose.methods import METHODS
from compose.methods.merge import MergeMethod
from pipelines.generate import generate
from pipelines.recipe import read_recipe
from pipelines.tiny import tiny_pipeline, write_random_lora
from ui import LoraLibrary, build_app
from ui.app import ComposeApp
from ui.form import arrange, build_recipe, check_triggers, python_code, suggest_prompt
from ui.library import upload_stem
from ui.options import option_fields, options_from_form, server_path_options
from ui.pictures import for_display, library_card, library_picture, mask_pictures, region_preview
from ui.previews import MAX_PREVIEWS_PER_SCAN, PREVIEW_ADAPTER, PreviewMaker


@pytest.fixture()
def library_dir(tmp_path, loras):
    folder = tmp_path / "library"
    folder.mkdir()
    shutil.copy(loras["cat"], folder / "cat.safetensors")
    shutil.copy(loras["dog"], folder / "dog.safetensors")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "cat.png")
    save_file({"weight": torch.zeros(2, 2)}, str(folder / "not_a_lora.safetensors"))
    return folder


@pytest.fixture()
def library(library_dir, tmp_path, pipe):
    return LoraLibrary([library_dir], tmp_path / "uploads", pipe=pipe)


def form_values(app: ComposeApp, **changes) -> dict:
    """What the browser would send: every widget's current value, then the changes."""
    widgets = app.form_inputs | {app.selection, app.suggested_prompt, app.history, app.compare_methods, app.show_maps}
    values = {widget: widget.value for widget in widgets}
    for name, value in changes.items():
        values[getattr(app, name)] = value
    return values


def select(app: ComposeApp, values: dict, names: list[str]) -> dict:
    """Apply the selection handler's updates to `values` as the browser would."""
    values[app.selection] = names
    updates = app.arrange_slots(values)
    widgets = [w for slot in app.slots for w in (slot.group, slot.title, *slot.inputs)]
    widgets += [app.slot_names, app.prompt, app.suggested_prompt]
    for widget, update in zip(widgets, updates):
        if not isinstance(update, dict):
            values[widget] = update
    return values


class NoProgress:
    def __call__(self, *args, **kwargs):
        pass


# ----- library ---------------------------------------------------------------------------------
def test_library_reads_triggers_previews_and_skips_non_loras(library, library_dir):
    assert sorted(library.entries) == ["cat", "dog"]
    cat = library.get("cat")
    assert (cat.trigger, cat.concept, cat.preview) == ("sks", "cat", library_dir / "cat.png")
    assert library.get("dog").preview is None
    assert "no LoRA weights" in library.skipped["not_a_lora.safetensors"]
    with pytest.raises(ComposeError, match="no LoRA named 'etc/passwd'"):
        library.get("etc/passwd")


def test_path_traversal_upload_stays_in_the_upload_folder(library, loras, tmp_path):
    entry = library.add_upload(loras["cat"], "../../evil.safetensors")
    assert entry.path.parent == library.upload_dir and entry.path.name == "evil.safetensors"
    assert not (tmp_path / "evil.safetensors").exists() and not (library.upload_dir.parent.parent / "evil.safetensors").exists()
    again = library.add_upload(loras["cat"], "..\\..\\evil.safetensors")
    assert again.path == library.upload_dir / "evil-2.safetensors"
    assert upload_stem("/etc/.hidden name!.safetensors") == "hidden_name"
    assert {p.name for p in library.upload_dir.iterdir()} == {"evil.safetensors", "evil-2.safetensors"}


def test_pickled_upload_is_refused_and_not_kept(library, tmp_path):
    pickled = tmp_path / "innocent.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pickled)
    with pytest.raises(NotSafetensorsError, match="pickled"):
        library.add_upload(pickled, "innocent.safetensors")
    with pytest.raises(NotSafetensorsError, match="pickled checkpoint"):
        library.add_upload(pickled, "model.ckpt")
    assert list(library.upload_dir.iterdir()) == []


def test_upload_size_limit_and_incompatible_lora(library, loras, tmp_path):
    library.upload_limit = 100
    with pytest.raises(ComposeError, match="upload limit"):
        library.add_upload(loras["cat"], "cat.safetensors")
    library.upload_limit = 10**9
    wrong = tmp_path / "wrong.safetensors"
    save_file({"unet.down.to_q.lora_A.weight": torch.zeros(4, 7), "unet.down.to_q.lora_B.weight": torch.zeros(7, 4)}, str(wrong))
    with pytest.raises(IncompatibleLoraError):
        library.add_upload(wrong, "wrong.safetensors")
    assert list(library.upload_dir.iterdir()) == []


# ----- option forms ----------------------------------------------------------------------------
@dataclasses.dataclass
class ExampleOptions:
    flag: bool = True
    count: int = 3
    scale: float | None = None
    mode: Literal["a", "b"] = "a"
    label: str | None = None
    steps: tuple = (1, 2)
    hidden: float = dataclasses.field(default=0.5, metadata={"advanced": True})


def test_option_fields_follow_the_dataclass():
    fields = {f.name: f for f in option_fields(ExampleOptions)}
    assert [(f.kind, f.optional) for f in fields.values()] == [
        ("bool", False), ("int", False), ("float", True), ("choice", False), ("str", True), ("json", False),
        ("float", False),
    ]  # fmt: skip
    assert fields["mode"].choices == ("a", "b")
    assert [f.name for f in fields.values() if f.advanced] == ["mode", "label", "steps", "hidden"]
    order = list(fields.values())
    assert options_from_form("x", order, [True, 3.0, None, "a", "", "[1, 2]", 0.5]) == {}
    assert options_from_form("x", order, [True, 3, "", "a", "", "[1, 2]", 0.5]) == {}  # an empty box is None
    assert options_from_form("x", order, [False, 4.0, "1.5", "b", "hi", "[3]", 0.5]) == {
        "flag": False, "count": 4, "scale": 1.5, "mode": "b", "label": "hi", "steps": [3],
    }  # fmt: skip
    with pytest.raises(InvalidOptionError, match="steps.*not valid JSON"):
        options_from_form("x", order, [True, 3, None, "a", "", "[1,", 0.5])
    with pytest.raises(InvalidOptionError, match="scale: 'big' is not a number"):
        options_from_form("x", order, [True, 3, "big", "a", "", "[1, 2]", 0.5])
    with pytest.raises(InvalidOptionError, match="count needs a value"):
        options_from_form("x", order, [True, None, None, "a", "", "[1, 2]", 0.5])


# ----- recipes and code ------------------------------------------------------------------------
def test_recipe_checks_bad_input_before_any_work(library, pipe):
    loras = arrange(["cat", "dog"], arrange(["cat"], [], library), library)
    assert [lora.box for lora in loras] == [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]  # default strips re-split
    moved = arrange(["dog", "cat"], [dataclasses.replace(loras[0], box=(0.1, 0.1, 0.9, 0.4), weight=0.3), loras[1]], library)
    assert [(lora.name, lora.box, lora.weight) for lora in moved] == [
        ("dog", (0.0, 0.0, 1.0, 0.5), 1.0), ("cat", (0.1, 0.1, 0.9, 0.4), 0.3),
    ]  # fmt: skip
    assert suggest_prompt(loras) == "a sks cat and a zwx dog"
    common = dict(model="tiny", negative_prompt="", seed=1, steps=2, guidance=5.0, height=64, width=64, library=library)
    with pytest.raises(ComposeError, match="no LoRA selected"):
        build_recipe(prompt="a cat", method="merge", options={}, loras=[], **common)
    bad_box = [dataclasses.replace(loras[0], use_region=True, box=(0.5, 0.2, 0.4, 0.9)), loras[1]]
    with pytest.raises(InvalidRegionError, match="LoRA 'cat'.*empty"):
        build_recipe(prompt="a sks cat", method="merge", options={}, loras=bad_box, **common)
    with pytest.raises(InvalidOptionError, match="switch_step"):
        build_recipe(prompt="a sks cat", method="switch", options={"switch_step": 0}, loras=loras, **common)
    recipe = build_recipe(prompt="a sks cat and a dog", method="merge", options={}, loras=loras, **common)
    with pytest.raises(TriggerNotInPromptError, match="'zwx'.*clear its trigger field"):
        check_triggers(pipe.tokenizer, recipe)
    cleared = [loras[0], dataclasses.replace(loras[1], trigger="")]
    check_triggers(pipe.tokenizer, build_recipe(prompt="a sks cat and a dog", method="merge", options={}, loras=cleared, **common))


def test_python_code_reproduces_the_image(library, pipe):
    loras = [dataclasses.replace(lora, weight=0.7) for lora in arrange(["cat", "dog"], [], library)]
    loras[1] = dataclasses.replace(loras[1], use_region=True)
    recipe = build_recipe(
        model="tiny", prompt="a sks cat and a zwx dog", negative_prompt="blurry", seed=3, steps=2, guidance=5.0,
        height=64, width=64, method="switch", options={"switch_step": 1}, loras=loras, library=library,
    )  # fmt: skip
    code = python_code(recipe)
    assert "method_options={'switch_step': 1}" in code and "region=(0.0, 0.5, 1.0, 1.0)" in code
    namespace: dict = {}
    exec(compile(code.replace('image.save("out.png")', ""), "<ui code>", "exec"), namespace)
    expected, _ = generate(pipe, recipe)
    np.testing.assert_array_equal(np.asarray(namespace["image"]), np.asarray(expected))


def test_pictures(library):
    loras = [dataclasses.replace(lora, use_region=True) for lora in arrange(["cat", "dog"], [], library)]
    preview = region_preview(loras, 64, 128, size=256)
    assert preview.size == (256, 128)
    assert preview.getpixel((64, 64)) != preview.getpixel((192, 64))  # two boxes, two colours
    assert for_display(Image.new("RGB", (64, 32))).size == (256, 128)
    masks = torch.zeros(3, 8, 8)
    masks[1, :, :4] = 1
    pictures = mask_pictures({"masks": masks, "pass_adapters": ["__base__", "cat", "dog"]}, ["cat", "dog"])
    assert [caption for _, caption in pictures] == ["mask: base", "mask: cat", "mask: dog"]
    cat = np.asarray(pictures[1][0])
    assert cat.shape == (128, 128) and cat[0, 0] == 255 and cat[0, -1] == 0
    assert mask_pictures({"losses": []}, ["cat"]) == []


# ----- the app ---------------------------------------------------------------------------------
def test_app_builds_and_lists_every_registered_method(library, pipe, monkeypatch):
    @dataclasses.dataclass
    class LaterOptions:
        strength: float = 0.5

    class LaterMethod(MergeMethod):
        """later: a method registered after the UI was written."""

        name = "later"
        options_class = LaterOptions

    monkeypatch.setitem(METHODS, "later", LaterMethod)
    app = ComposeApp(pipe, library, "tiny")
    assert isinstance(build_app(pipe, library, "tiny"), gr.Blocks)
    assert app.method.choices == [(name, name) for name in METHODS]
    assert [field.name for field in app.method_forms["later"].fields] == ["strength"]
    assert app.show_method("later")[0] == "later: a method registered after the UI was written."


def test_generate_handler_writes_png_with_recipe_and_reports_errors(library, pipe, tmp_path):
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out")
    values = select(app, form_values(app, steps=2), ["cat", "dog"])
    assert values[app.prompt] == "a sks cat and a zwx dog"
    values[app.slots[1].weight] = 0.5
    history, status, download, seed, _ = app.generate(values, progress=NoProgress())
    assert len(history) == 1 and history[0][0].size == (256, 256) and "2 steps" in status
    recipe = read_recipe(download["value"])
    assert [(lora["name"], lora["weight"]) for lora in recipe["loras"]] == [("cat", 1.0), ("dog", 0.5)]
    assert "weight=0.5" in app.show_code(values)
    values[app.prompt] = "a sks cat and a dog"
    with pytest.raises(gr.Error, match="trigger word 'zwx'"):
        app.generate(values, progress=NoProgress())
    with pytest.raises(gr.Error, match="no LoRA selected"):
        app.generate(select(app, values, []), progress=NoProgress())


def test_compare_labels_each_method_shows_masks_and_reports_a_method_that_cannot_run(library, pipe, tmp_path):
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out")
    values = select(app, form_values(app, steps=2, compare_methods=["merge", "clora", "composer"], show_maps=True), ["cat", "dog"])
    clora = app.method_forms["clora"]
    values[clora.inputs[[field.name for field in clora.fields].index("refinement_rounds")]] = 1
    values[app.method_forms["switch"].inputs[0]] = 0  # a bad option of one method must not stop the others
    values[app.compare_methods].insert(1, "switch")
    cells, masks, seed = app.compare(values, progress=NoProgress())
    captions = [caption for _, caption in cells]
    assert captions[0].startswith("merge (") and captions[2].startswith("clora (")
    assert captions[1].startswith("switch: ") and "switch_step" in captions[1]
    assert captions[3].startswith("composer: ") and "region" in captions[3]  # composer needs a box per LoRA
    assert masks["visible"] and [caption for _, caption in masks["value"]] == [
        "clora mask: base", "clora mask: cat", "clora mask: dog",
    ]  # fmt: skip


def test_ui_command_line(tmp_path):
    from pipelines.cli import build_parser
    from ui import cli

    args = build_parser("ui").parse_args(["ui", "--model", "tiny", "--lora-dir", "a", "--lora-dir", "b", "--port", "7999"])
    assert (args.run, args.model, [str(d) for d in args.lora_dir], args.host, args.port) == (
        cli.run, "tiny", ["a", "b"], "127.0.0.1", 7999,
    )  # fmt: skip
    assert cli.lora_folders(args) == [Path("a"), Path("b")]
    assert cli.lora_folders(build_parser("ui").parse_args(["ui", "--model", "tiny"])) == []
    import toyworld

    on_toy = build_parser("ui").parse_args(["ui", "--model", str(toyworld.default_model_path())])
    assert cli.lora_folders(on_toy) == [toyworld.default_lora_path()]
    assert cli.app_settings(on_toy) == {
        "server_options": {}, "preview_dir": cli.DEFAULT_PREVIEW_DIR, "preview_limit": MAX_PREVIEWS_PER_SCAN,
    }  # fmt: skip
    configured = ["ui", "--profile-cache-dir", str(tmp_path / "profiles"), "--max-previews", "0"]
    assert cli.app_settings(build_parser("ui").parse_args(configured)) == {
        "server_options": {"profile_cache_dir": str(tmp_path / "profiles")}
    }


def test_upload_handler_adds_the_lora_to_the_choices(library, pipe, loras, tmp_path):
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out")
    browser_copy = tmp_path / "cache" / "my style.safetensors"
    browser_copy.parent.mkdir()
    shutil.copy(loras["car"], browser_copy)
    cards, notes, selection, view, *examples = app.add_upload(str(browser_copy), app.library_view.value, ["cat"])
    assert (selection["choices"], selection["value"]) == (["cat", "dog", "my_style"], ["cat"])
    assert "3 LoRAs" in notes and len(cards) == 3 and view["names"] == ["cat", "dog", "my_style"]
    assert library.get("my_style").trigger == "vrn"
    browser_copy.rename(browser_copy.with_suffix(".bin"))
    with pytest.raises(gr.Error, match="pickled checkpoint"):
        app.add_upload(str(browser_copy.with_suffix(".bin")), view, ["cat"])


def test_another_visitors_upload_reaches_every_page(library, pipe, loras, tmp_path):
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out")
    first_page = app.library_view.value  # what a page opened before the upload shows
    assert app.sync_library(first_page, []) == [gr.skip()] * 6  # nothing new: the page is left alone
    library.add_upload(loras["car"], "car.safetensors")  # another visitor's upload
    cards, notes, selection, view, *_ = app.sync_library(first_page, [])
    assert selection["choices"] == ["cat", "dog", "car"] and len(cards) == 3 and "3 LoRAs" in notes
    event = gr.SelectData(None, {"index": 2, "value": None})
    assert app.add_from_library(view, [], event) == ["car"]  # a click means the tile the page shows


# ----- server paths ----------------------------------------------------------------------------
@dataclasses.dataclass
class ServerPathOptions:
    strength: float = 0.5
    cache_dir: str | None = dataclasses.field(default=None, metadata={"server_path": True})


def test_options_that_name_server_paths_get_no_form_field():
    assert [field.name for field in option_fields(ServerPathOptions)] == ["strength"]
    assert server_path_options(ServerPathOptions) == {"cache_dir"}
    assert "profile_cache_dir" in server_path_options(METHODS["cmlora"].options_class)
    for name, method in METHODS.items():  # a path-like option of any method must carry the marker
        names = [field.name for field in option_fields(method.options_class)]
        path_like = [name for name in names if re.search(r"(dir|path|file|folder)$", name)]
        assert path_like == [], f"{name} shows server paths in its form: {path_like}"


def test_cmlora_profiles_go_where_the_server_says_and_not_into_the_recipe(library, pipe, tmp_path):
    profiles = tmp_path / "server-profiles"
    server_options = {"profile_cache_dir": str(profiles)}
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out", server_options=server_options)
    form = app.method_forms["cmlora"]
    names = [field.name for field in form.fields]
    assert "profile_cache_dir" not in names
    values = select(app, form_values(app, steps=2, method="cmlora"), ["cat", "dog"])
    values[form.inputs[names.index("profile_steps")]] = 1
    _, _, download, _, _ = app.generate(values, progress=NoProgress())
    assert len(list(profiles.glob("*.json"))) == 2  # one profile per LoRA, in the server's folder
    recipe = read_recipe(download["value"])
    assert recipe["method"] == "cmlora" and "profile_cache_dir" not in recipe["options"]
    assert recipe["options"]["profile_steps"] == 1


# ----- messages without server paths ---------------------------------------------------------
def test_errors_name_the_lora_not_server_paths(library, library_dir, pipe, tmp_path):
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out")
    broken = tmp_path / "browser" / "broken.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"\x01")
    with pytest.raises(gr.Error) as refused:
        app.add_upload(str(broken), app.library_view.value, [])
    assert "broken.safetensors is too short" in refused.value.message
    assert str(library.upload_dir) not in refused.value.message and ".part" not in refused.value.message
    values = select(app, form_values(app, steps=2), ["cat", "dog"])
    (library_dir / "dog.safetensors").write_bytes(b"\x01")  # changed on disk after the scan
    with pytest.raises(gr.Error) as failed:
        app.generate(values, progress=NoProgress())
    assert "LoRA 'dog' is too short" in failed.value.message and str(library_dir) not in failed.value.message
    library.folders.append(tmp_path / "gone")
    library.refresh()
    assert str(tmp_path) not in app._library_notes() and "dog.safetensors" in app._library_notes()


# ----- previews --------------------------------------------------------------------------------
def test_previews_are_made_in_the_background_and_cached_by_file_and_model(library, library_dir, pipe, loras, tmp_path):
    cache = tmp_path / "previews"
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out", preview_dir=cache)
    page = app.library_view.value
    app.previews.join()
    made = list(cache.glob("*.png"))
    assert [path.name for path in made] == [f"{file_sha256(library_dir / 'dog.safetensors')}-{app.previews.model}.png"]
    cards, *_ = app.sync_library(page, [])  # the open page gets the new picture
    expected = np.asarray(library_picture(made[0]))
    assert np.array_equal(np.asarray(cards[1][0]), expected) and expected.std() > 0
    assert np.array_equal(np.asarray(cards[0][0]), np.asarray(library_picture(library_dir / "cat.png")))  # its PNG wins
    shutil.copy(loras["car"], library_dir / "dog.safetensors")  # same name, another file: a new preview
    app.rescan(app.library_view.value, [])
    app.previews.join()
    assert len(list(cache.glob("*.png"))) == 2
    restarted = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out", preview_dir=cache, preview_limit=0)
    restarted.previews.join()  # a limit of 0 generates nothing, and the cached preview is still found
    assert restarted.previews.picture(library.get("dog")) == restarted.previews.cache_file(library.get("dog"))
    assert restarted.previews.cache_file(library.get("dog")).is_file()
    other_model = PreviewMaker(tiny_pipeline(seed=1), cache, threading.Lock())
    assert other_model.cache_file(library.get("dog")) != restarted.previews.cache_file(library.get("dog"))


def test_previews_never_hold_up_a_page_and_stop_at_the_limit(library_dir, pipe, loras, tmp_path, monkeypatch):
    shutil.copy(loras["car"], library_dir / "car.safetensors")
    shutil.copy(loras["te"], library_dir / "te.safetensors")
    library = LoraLibrary([library_dir], tmp_path / "uploads", pipe=pipe)
    slow = threading.Event()
    render = PreviewMaker._render
    monkeypatch.setattr(PreviewMaker, "_render", lambda maker, *args: (slow.wait(), render(maker, *args)))
    previews = dict(preview_dir=tmp_path / "previews", preview_limit=2)
    app = ComposeApp(pipe, library, "tiny", output_dir=tmp_path / "out", **previews)
    cards, *_ = app.sync_library({"names": [], "version": None}, [])  # while a preview is still being made
    assert [caption for _, caption in cards] == ["car · vrn", "cat · sks", "dog · zwx", "te · sks"]
    assert np.array_equal(np.asarray(cards[2][0]), np.asarray(library_card("dog")))
    slow.set()
    app.previews.join()
    assert len(list((tmp_path / "previews").glob("*.png"))) == 2  # car, dog and te need one, the limit is two
    assert list(pipe.unet.peft_config) == [PREVIEW_ADAPTER]  # each preview's LoRA replaced the last one


# ----- examples --------------------------------------------------------------------------------
@pytest.fixture()
def shapes_library(tmp_path, pipe):
    """LoRAs with the toy model's trigger and concept words (random weights) for the examples."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    for seed, (trigger, concept) in enumerate([("sks", "square"), ("zwx", "circle"), ("qpl", "style")], start=1):
        write_random_lora(pipe, folder / f"{trigger}.safetensors", seed, trigger=trigger, concept=concept)
    return LoraLibrary([folder], tmp_path / "shape-uploads", pipe=pipe)


def apply(app: ComposeApp, values: dict, outputs: list, updates: list) -> dict:
    for widget, update in zip(outputs, updates):
        if not isinstance(update, dict):
            values[widget] = update
    return values


def test_examples_fill_the_form_in_one_click_and_only_with_their_loras(shapes_library, library, pipe, tmp_path):
    app = ComposeApp(pipe, shapes_library, "tiny", output_dir=tmp_path / "out")
    assert [button.visible for button in app.example_buttons] == [True, True]
    assert [button.visible for button in ComposeApp(pipe, library, "tiny").example_buttons] == [False, False]
    values = apply(app, form_values(app, steps=2), app.example_outputs(0), app.use_example(0))
    assert values[app.prompt] == "a sks square on the left and a zwx circle on the right"
    assert (values[app.selection], values[app.method]) == (["sks", "zwx"], "regional")
    assert [app.slots[0].read(values, "sks").box, app.slots[1].read(values, "zwx").box] == [
        (0.2, 0.05, 0.8, 0.45), (0.2, 0.55, 0.8, 0.95),
    ]  # fmt: skip
    assert values[app.slots[0].use_region] and values[app.slots[1].use_region]
    values = select(app, values, values[app.selection])  # the selection's own change event keeps all of it
    assert values[app.prompt].endswith("on the right") and app.slots[1].read(values, "zwx").box[1] == 0.55
    history, status, *_ = app.generate(values, progress=NoProgress())
    assert "regional" in status and len(history) == 1
    style = apply(app, values, app.example_outputs(1), app.use_example(1))
    assert style[app.prompt].endswith("in qpl style") and style[app.selection] == ["sks", "zwx", "qpl"]
    assert app.recipe(style)["options"] == {"background": "qpl"} and not style[app.slots[2].use_region]
    assert app.recipe(apply(app, style, app.example_outputs(0), app.use_example(0)))["options"] == {}

"""`loracompose generate`: every bad argument or recipe fails before any image, and a recipe replays only
with the LoRA files it recorded."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image, PngImagePlugin

from compose.loading import PREFERRED_WEIGHT_NAME
from pipelines import generate as generate_module
from pipelines import loading
from pipelines.cli import main
from pipelines.recipe import RECIPE_KEY, read_recipe
from pipelines.tiny import tiny_pipeline, write_random_lora


def generate(*args) -> int:
    return main(["generate", "--model", "tiny", "--steps", "1", *map(str, args)])


def pixels(path):
    with Image.open(path) as image:
        return list(image.getdata())


def test_a_changed_lora_file_is_refused_unless_accepted_and_then_recorded(loras, tmp_path, capsys):
    lora = tmp_path / "cat.safetensors"
    shutil.copy(loras["cat"], lora)
    first = tmp_path / "first.png"
    assert generate("--prompt", "a sks cat", "--lora", lora, "--out", first) == 0
    assert generate("--from-png", first, "--out", tmp_path / "same.png") == 0
    assert pixels(tmp_path / "same.png") == pixels(first)

    shutil.copy(loras["te"], lora)  # another LoRA (same trigger) under the recorded name
    again = tmp_path / "again.png"
    assert generate("--from-png", first, "--out", again) == 2
    error = capsys.readouterr().err
    assert "LoRA 'cat'" in error and str(lora) in error and "--accept-changed-loras" in error
    assert not again.exists()

    assert generate("--from-png", first, "--out", again, "--accept-changed-loras") == 0
    recorded, replayed = read_recipe(first), read_recipe(again)
    [changed] = replayed["accepted_changed_loras"]
    assert (changed["recorded"], changed["now"]) == (recorded["loras"][0]["sha256"], replayed["loras"][0]["sha256"])
    assert changed["recorded"] != changed["now"] and pixels(again) != pixels(first)


def test_a_trigger_missing_from_the_prompt_fails_with_merge(loras, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert generate("--prompt", "a red circle", "--lora", loras["cat"], "--out", out) == 2
    assert "needs its trigger word 'sks'" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "a cat", "--steps", "0"], "at least 1, got 0"),
        (["--prompt", "a cat", "--steps", "-1"], "at least 1, got -1"),
        (["--prompt", "a cat", "--height", "0"], "height 0 must be a positive multiple of 8"),
        (["--prompt", "a cat", "--width", "38"], "width 38 must be a positive multiple of 8 pixels, e.g. 40"),
        (["--prompt", ""], "--prompt: prompt must be a non-empty string"),
        (["--prompt", "   "], "--prompt: prompt must be a non-empty string"),
        ([], "--prompt is needed"),
        (["--prompt", "a cat", "--method", "nope"], "unknown method 'nope'"),
        (["--prompt", "a cat", "--option", "nope=1"], "no option(s) ['nope']"),
        (["--prompt", "a cat", "--region", "0,0,1,1"], "1 --region values for 0 --lora"),
        (["--prompt", "a cat", "--trigger", "sks"], "1 --trigger values for 0 --lora"),
        (["--prompt", "a cat", "--out", "image.jpg"], "name the file image.png"),
    ],
)
def test_bad_arguments_fail_before_any_image(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert generate(*args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_extra_regions_beyond_the_loras_are_refused(loras, tmp_path, capsys):
    region = ["--region", "0,0,1,0.5"]
    args = ["--prompt", "a sks cat", "--lora", loras["cat"], *region, *region, "--out", tmp_path / "x.png"]
    assert generate(*args) == 2
    assert "2 --region values for 1 --lora" in capsys.readouterr().err


def test_a_region_that_is_not_four_numbers_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate("--prompt", "a sks cat", "--region", "a,b,c,d")
    assert exit_info.value.code == 2 and "four numbers T,L,B,R" in capsys.readouterr().err


def png_with_recipe(path, text: str):
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


GOOD = {"prompt": "a cat", "seed": 0, "steps": 1, "guidance": 7.5, "method": "merge", "loras": []}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds list, not a recipe table"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}), "has no prompt"),
        (json.dumps(dict(GOOD, seed="zero")), "seed must be a whole number, got 'zero'"),
        (json.dumps(dict(GOOD, loras=[{"weight": 1.0}])), "LoRA 1 must be a table with its file under 'source'"),
        (json.dumps(dict(GOOD, loras=[{"source": "x.safetensors", "trigger": 5}])), "trigger must be a string"),
        (json.dumps(dict(GOOD, options=[1])), "options must be a table"),
    ],
)
def test_damaged_recipes_are_typed_errors(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setattr(generate_module, "load_pipeline", lambda model: pytest.fail("checked after loading"))
    png = png_with_recipe(tmp_path / "damaged.png", text)
    assert generate("--from-png", png, "--out", tmp_path / "out.png") == 2
    error = capsys.readouterr().err
    assert message in error and ("damaged.png" in error or "JSON" in error)


def test_files_that_are_not_loracompose_pngs_are_typed_errors(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    cases = {"photo.jpg": "carries no loracompose recipe", "notes.png": "is not a readable PNG",
             "plain.png": "carries no loracompose recipe", "missing.png": "does not exist"}  # fmt: skip
    for name, message in cases.items():
        assert generate("--from-png", tmp_path / name, "--out", tmp_path / "out.png") == 2
        assert message in capsys.readouterr().err


def test_output_paths_are_checked_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate_module, "load_pipeline", lambda model: pytest.fail("checked after loading"))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path / "folder.png", "is a folder"), (tmp_path / "file" / "x.png", "is not a folder")]:
        assert generate("--prompt", "a cat", "--out", out) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png"]  # no stray .part file


def test_diffusers_files_of_one_name_compose_and_can_be_named(tmp_path, capsys):
    reference = tiny_pipeline()
    first = write_random_lora(reference, tmp_path / "style" / PREFERRED_WEIGHT_NAME, 1)
    second = write_random_lora(reference, tmp_path / "other" / "style" / PREFERRED_WEIGHT_NAME, 2)
    out = tmp_path / "out.png"
    assert generate("--prompt", "a cat", "--lora", first, "--lora", second, "--out", out) == 0
    assert [lora["name"] for lora in read_recipe(out)["loras"]] == ["style", "style_2"]
    args = ["--prompt", "a cat", "--lora", f"{first}:0.5@soft", "--lora", f"{second}@hard", "--out", out]
    assert generate(*args) == 0
    assert [(lora["name"], lora["weight"]) for lora in read_recipe(out)["loras"]] == [("soft", 0.5), ("hard", 1.0)]


@pytest.fixture()
def builtin_model(tmp_path, monkeypatch):
    """A tiny pipeline saved as if it were the installed built-in model."""
    folder = tmp_path / "site-packages" / "toyworld" / "model"
    tiny_pipeline().save_pretrained(folder)
    monkeypatch.setattr(loading, "builtin_model_path", lambda: folder)
    return folder


def test_the_built_in_model_is_recorded_by_name_and_old_paths_still_replay(builtin_model, tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", "--prompt", "a cat", "--steps", "1", "--out", str(out)]) == 0
    assert read_recipe(out)["model"] == "toyworld"
    assert main(["generate", "--from-png", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert pixels(tmp_path / "again.png") == pixels(out)

    recipe = read_recipe(out)
    for recorded in (str(builtin_model), "/home/someone/venv/site-packages/toyworld/model"):
        old = png_with_recipe(tmp_path / "old.png", json.dumps(dict(recipe, model=recorded)))
        assert main(["generate", "--from-png", str(old), "--out", str(tmp_path / "replayed.png")]) == 0
        assert pixels(tmp_path / "replayed.png") == pixels(out)
        assert read_recipe(tmp_path / "replayed.png")["model"] == "toyworld"

"""`loracompose ui`: serve the web UI for one model and the LoRAs in some folders."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.loading import default_model, load_pipeline

from .library import DEFAULT_UPLOAD_LIMIT, LoraLibrary
from .previews import MAX_PREVIEWS_PER_SCAN

DEFAULT_UPLOAD_DIR = Path("~/.cache/loracompose/uploads")
DEFAULT_PREVIEW_DIR = Path("~/.cache/loracompose/previews")


def run(args) -> int:
    from .app import CSS, build_app  # gradio loads only when the UI is served

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    limit = args.max_upload_mb * 2**20
    library = LoraLibrary(lora_folders(args), args.upload_dir, pipe=pipe, upload_limit=limit)
    print(f"{len(library.entries)} LoRAs from {', '.join(map(str, library.folders)) or 'no folder'}; uploads go to {library.upload_dir}")
    app = build_app(pipe, library, pipe.model_name, **app_settings(args))
    # show_error=False: only the UI's own messages reach visitors, not raw exceptions naming server files
    app.launch(server_name=args.host, server_port=args.port, max_file_size=limit, show_error=False, css=CSS)
    return 0


def app_settings(args) -> dict:
    """What the server decides, never a visitor: where method caches and previews are written."""
    server_options = {"profile_cache_dir": str(args.profile_cache_dir)} if args.profile_cache_dir else {}
    previews = {"preview_dir": args.preview_dir, "preview_limit": args.max_previews} if args.max_previews else {}
    return {"server_options": server_options, **previews}


def lora_folders(args) -> list[Path]:
    """The --lora-dir folders; without any, on the built-in toy model, its shipped concept LoRAs."""
    if args.lora_dir:
        return args.lora_dir
    from toyworld import default_lora_path, default_model_path

    return [default_lora_path()] if Path(args.model) == default_model_path() else []


def register(subparsers) -> None:
    parser = subparsers.add_parser("ui", help="serve the web UI")
    parser.add_argument("--model", default=default_model(), help="diffusers folder or 'tiny' (default: %(default)s)")
    parser.add_argument("--lora-dir", action="append", default=[], type=Path, help="folder of .safetensors LoRAs; repeat (default on the built-in model: its concept LoRAs)")
    parser.add_argument("--upload-dir", type=Path, default=DEFAULT_UPLOAD_DIR, help="private folder for uploads")
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_UPLOAD_LIMIT // 2**20)
    parser.add_argument(
        "--profile-cache-dir", type=Path,
        help="cmlora's frequency-profile cache (default: $LORACOMPOSE_PROFILE_CACHE or ~/.cache/loracompose/profiles)",
    )  # fmt: skip
    parser.add_argument("--preview-dir", type=Path, default=DEFAULT_PREVIEW_DIR, help="cache of the library's previews")
    parser.add_argument(
        "--max-previews", type=int, default=MAX_PREVIEWS_PER_SCAN,
        help="previews generated per library scan, in the background (0: none) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a machine busy with other work)")
    parser.set_defaults(run=run)

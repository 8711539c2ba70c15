"""The LoRA library the web UI offers: files found in configured folders plus checked uploads.

The UI refers to a LoRA by its library name only, so no path typed in a browser is ever opened.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compose.errors import ComposeError, NotSafetensorsError
from compose.loading import (
    CONCEPT_KEY,
    PICKLE_SUFFIXES,
    check_compatible,
    inspect_lora_file,
    trigger_from_metadata,
)

DEFAULT_UPLOAD_LIMIT = 256 * 1024 * 1024
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class LoraEntry:
    """One usable LoRA file: its library name, where it is, what its metadata says."""

    name: str
    path: Path
    trigger: str | None
    concept: str | None
    preview: Path | None
    format: str


class LoraLibrary:
    """LoRAs in `folders` (not recursive) and in a private `upload_dir`, checked against `pipe`.

    Files that are not LoRAs, or that do not fit the model, are listed in `skipped` with the reason.
    """

    def __init__(self, folders, upload_dir: str | Path, pipe=None, upload_limit: int = DEFAULT_UPLOAD_LIMIT):
        self.folders = [Path(folder).expanduser().resolve() for folder in folders]
        self.upload_dir = Path(upload_dir).expanduser().resolve()
        self.upload_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pipe = pipe
        self.upload_limit = upload_limit
        self.entries: dict[str, LoraEntry] = {}
        self.skipped: dict[str, str] = {}
        self.version = 0  # counts scans, so every page can tell that its view is out of date
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders again (a file dropped in while the UI runs appears after this)."""
        entries: dict[str, LoraEntry] = {}
        skipped: dict[str, str] = {}
        for number, folder in enumerate([*self.folders, self.upload_dir], start=1):
            if not folder.is_dir():
                skipped[f"library folder {number}"] = "folder does not exist"
                continue
            for path in sorted(folder.glob("*.safetensors")):
                try:
                    entry = self._entry(path, _unique(path.stem, entries))
                except ComposeError as error:
                    skipped[path.name] = hide_paths(str(error), {str(path): path.name})
                    continue
                entries[entry.name] = entry
        self.entries, self.skipped = entries, skipped
        self.version += 1

    def public_message(self, text: str) -> str:
        """A message for visitors: the LoRAs' files named by their library names, folders not named at all."""
        names = {str(entry.path): f"LoRA '{entry.name}'" for entry in self.entries.values()}
        names.update({str(folder): "a library folder" for folder in self.folders})
        names[str(self.upload_dir)] = "the upload folder"
        return hide_paths(text, names)

    def get(self, name: str) -> LoraEntry:
        if name not in self.entries:
            raise ComposeError(f"there is no LoRA named '{name}' in the library; choose one from the list")
        return self.entries[name]

    def add_upload(self, uploaded: str | Path, client_name: str) -> LoraEntry:
        """Accept an uploaded file: size, name and safetensors header are checked before it is kept."""
        uploaded = Path(uploaded)
        size = uploaded.stat().st_size
        if size > self.upload_limit:
            raise ComposeError(
                f"{_base_name(client_name)} is {size / 2**20:.0f} MB, more than the {self.upload_limit / 2**20:.0f} MB upload "
                "limit; put large files into a --lora-dir folder instead"
            )
        stem = upload_stem(client_name)
        # The header is read from a copy inside the private folder, under a name nobody else chose.
        handle, staging = tempfile.mkstemp(suffix=".part", dir=self.upload_dir)
        os.close(handle)
        staging = Path(staging)
        try:
            shutil.copyfile(uploaded, staging)
            self._entry(staging, stem)  # read_header refuses pickles, then the layers must fit the model
        except ComposeError as error:  # the message names the staging copy: name the file the visitor sent
            shown = _base_name(client_name) or "the upload"
            raise type(error)(hide_paths(str(error), {str(staging): shown})) from error
        else:
            target = self.upload_dir / f"{_unique(stem, {p.stem for p in self.upload_dir.glob('*.safetensors')})}.safetensors"
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        self.refresh()
        return next(entry for entry in self.entries.values() if entry.path == target)

    def _entry(self, path: Path, name: str) -> LoraEntry:
        info = inspect_lora_file(path)
        if self.pipe is not None:
            check_compatible(info, self.pipe)
        preview = path.with_suffix(".png")
        return LoraEntry(
            name=name,
            path=path,
            trigger=trigger_from_metadata(info.metadata),
            concept=info.metadata.get(CONCEPT_KEY) or None,
            preview=preview if preview.is_file() else None,
            format=info.format,
        )


def upload_stem(client_name: str) -> str:
    """A safe file stem from the name a browser sent: no folders, no dots in front, only plain characters."""
    base = _base_name(client_name)
    suffix = Path(base).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise NotSafetensorsError(
            f"{base} is a pickled checkpoint ({suffix}); pickles are never loaded because they can run code. "
            "Convert it to .safetensors first"
        )
    if suffix != ".safetensors":
        raise ComposeError(f"{base or 'the upload'} is not a .safetensors file; only .safetensors LoRAs are accepted")
    stem = _UNSAFE_NAME_CHARACTERS.sub("_", base[: -len(suffix)]).strip("_-")[:80]
    return stem or "lora"


def _base_name(client_name: str | None) -> str:
    """The last part of a name a browser sent, whichever separator its system uses."""
    return re.split(r"[\\/]", client_name or "")[-1]


def hide_paths(text: str, names: dict[str, str]) -> str:
    """`text` with each path in `names` replaced by its label, longest first (a file before its folder)."""
    for path in sorted(names, key=len, reverse=True):
        text = text.replace(path, names[path])
    return text


def _unique(stem: str, taken) -> str:
    name, number = stem, 2
    while name in taken:
        name, number = f"{stem}-{number}", number + 1
    return name

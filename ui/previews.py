"""Library previews: what each LoRA draws, made once on the served model and cached on disk.

A preview is the LoRA's own prompt ("a sks square") run on the current model with that LoRA alone.
Its cache file is named by the LoRA file's sha256 and the model's identity, so a changed file or
another model gets a new picture. Pictures are made one at a time in a background thread that holds
the pipeline lock: a page load never waits for them, and they never run inside a visitor's generation.
A `name.png` beside the LoRA file wins over a made preview.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from pathlib import Path

from compose.loading import file_sha256
from compose.profiling import model_identity
from pipelines.generate import generate

from .form import LoraSettings, suggest_prompt
from .library import LoraEntry

PREVIEW_STEPS = 16
# every preview loads its LoRA under this one adapter name, replacing the last one: memory stays flat
PREVIEW_ADAPTER = "library_preview"
MAX_PREVIEWS_PER_SCAN = 32  # a large new library costs at most this many generations per scan
_log = logging.getLogger(__name__)


class PreviewMaker:
    """Previews of library LoRAs, kept in `folder`; `version` grows with every new picture."""

    def __init__(self, pipe, folder: str | Path, lock: threading.Lock, steps: int = PREVIEW_STEPS,
                 limit: int = MAX_PREVIEWS_PER_SCAN):  # fmt: skip
        self.pipe = pipe
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock = lock
        self.steps = steps
        self.limit = limit
        self.model = model_identity(pipe)[:16]
        self.version = 0
        self._pictures: dict[tuple, Path] = {}  # (file, size, mtime) -> its preview
        self._pending: set[tuple] = set()
        self._budget = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def picture(self, entry: LoraEntry) -> Path | None:
        """The picture to show for a LoRA now: its own PNG, else a made preview, else None (not made yet)."""
        if entry.preview:
            return entry.preview
        key = _file_key(entry.path)
        return self._pictures.get(key) if key else None

    def request(self, entries) -> None:
        """Queue the LoRAs without a picture; up to `limit` of them are generated, cached ones just found."""
        self._budget = self.limit
        for entry in entries:
            key = _file_key(entry.path)
            if entry.preview or key is None or key in self._pictures or key in self._pending:
                continue
            self._pending.add(key)
            self._queue.put((entry, key))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lora-previews", daemon=True)
            self._thread.start()

    def join(self) -> None:
        """Wait until every requested preview is made or found (tests; warming the cache)."""
        self._queue.join()

    def cache_file(self, entry: LoraEntry) -> Path:
        return self.folder / f"{file_sha256(entry.path)}-{self.model}.png"

    def _work(self) -> None:
        while True:
            entry, key = self._queue.get()
            try:
                target = self.cache_file(entry)
                if not target.is_file():
                    if self._budget <= 0:
                        continue
                    self._budget -= 1
                    self._render(entry, target)
                self._pictures[key] = target
                self.version += 1
            except Exception:  # one LoRA that cannot be previewed must not stop the others'
                _log.warning("no preview for LoRA '%s'", entry.name, exc_info=True)
            finally:
                self._pending.discard(key)
                self._queue.task_done()

    def _render(self, entry: LoraEntry, target: Path) -> None:
        settings = LoraSettings(entry.name, trigger=entry.trigger or "", concept=entry.concept or "")
        recipe = {
            "prompt": suggest_prompt([settings]),
            "steps": self.steps,
            "guidance": 7.5,
            "seed": 0,
            "method": "merge",
            "loras": [{"source": str(entry.path), "name": PREVIEW_ADAPTER, "trigger": entry.trigger}],
        }
        with self.lock:
            image, _ = generate(self.pipe, recipe)
        handle, partial = tempfile.mkstemp(suffix=".part", dir=self.folder)
        os.close(handle)
        image.save(partial, format="PNG")
        os.replace(partial, target)  # a reader never sees half a file


def _file_key(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:  # removed since the last scan
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns)

"""Compressing many images side by side: one process per job, one progress bar.

Each worker process loads the model once and runs torch on one thread, so
`--jobs N` keeps N cores busy with N images. Files are identical whatever the
job count (format version 2 computes the same numbers with any thread count).
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from vaezip.imaging.images import Image


@dataclass(frozen=True)
class Compressed:
    """What one compressed image reports: sizes in bytes, `subpixels` = pixels x channels."""

    source: Path
    target: Path
    source_bytes: int
    output_bytes: int
    subpixels: int
    seconds: float
    mode: str = ""
    source_format: str = ""  # a lossy format whose decoded pixels were coded ("JPEG"), else ""


def compress_file(source: Path, target: Path, model: Optional[str], force: bool,
                  progress: Optional[Callable[[int], None]] = None,
                  on_image: Optional[Callable[["Image"], None]] = None, effort: Optional[int] = None) -> Compressed:
    """Read `source`, compress it, write `target` atomically (creating its folder).

    Args:
        effort: encoder effort 1..9 (None: the default).
        progress: called with the number of tiles finished.
        on_image: called with the image once it is read (to size a progress bar).
    """
    from vaezip import api
    from vaezip.files import atomic_write
    from vaezip.imaging.images import read_image

    start = time.perf_counter()
    image = read_image(source)
    if on_image is not None:
        on_image(image)
    data = api.compress(image, model, progress=progress, **({} if effort is None else {"effort": effort}))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, force) as tmp:
        tmp.write_bytes(data)
    return Compressed(source, target, source.stat().st_size, len(data), image.num_subpixels,
                      time.perf_counter() - start, image.mode, image.source)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def compress_parallel(pairs: Sequence[tuple[Path, Path]], model: Optional[str], force: bool, jobs: int,
                      done: Callable[[Compressed], None], effort: Optional[int] = None) -> None:
    """Compress (source, target) pairs in `jobs` processes; `done` is called as each finishes.

    Raises:
        The first worker's error (a `VaezipError` carries its one-line message);
        images not started by then are not compressed.
    """
    with ProcessPoolExecutor(jobs, initializer=_one_thread) as pool:
        futures = [pool.submit(compress_file, s, t, model, force, None, None, effort) for s, t in pairs]
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                done(future.result())

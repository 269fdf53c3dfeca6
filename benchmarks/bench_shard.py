"""``retina-bench shard``: packing speed against the simplest tools that do less.

- store mode: ``retina-shard pack`` (2 workers; checks every image, writes tars + DALI idx + index + manifest with
  sha256) vs. GNU ``tar cf`` of the same files (no checks, no index, no checksums). Goal: ratio >= 1.0.
- resize mode: ``retina-shard pack --resize 256`` vs. a naive loop ``Image.open -> convert -> resize(LANCZOS) ->
  save JPEG`` in one process. Goal: ratio >= 2.5.

Images are procedural 512 px fundus JPEGs from ``retina-synth``, generated once into the cache folder.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from benchmarks.common import BenchResult, Row, best_of, ensure_images, warm_cache
from retina_io.imaging import target_size
from retina_io.pack import PackConfig, pack

STORE_GOAL = 1.0
RESIZE_GOAL = 2.5


def naive_resize(files: list[Path], out: Path, short_side: int, quality: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(files):
        im = Image.open(p).convert("RGB")
        im = im.resize(target_size(im.width, im.height, short_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        (out / f"{i}.jpg").write_bytes(buf.getvalue())


def run(*, quick: bool = False, workers: int = 2, cache: Path | None = None) -> BenchResult:
    n = 300 if quick else 2000
    repeats = 1 if quick else 2
    cache = cache or Path(tempfile.gettempdir()) / "retina-bench-cache"
    images, labels = ensure_images(cache, n=n)
    files = sorted((images / "Fundus").glob("*.jpg"))
    nbytes = warm_cache(files)
    logging.getLogger("retina_io").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="retina-bench-shard-") as tmp:
        tmp = Path(tmp)

        def tar_cf():
            subprocess.run(["tar", "cf", str(tmp / "plain.tar"), "-C", str(images), "Fundus"], check=True)

        def ours(resize=None, check="decode"):
            out = tmp / f"packed-{resize}-{check}"
            shutil.rmtree(out, ignore_errors=True)
            pack(
                PackConfig(
                    images=images,
                    labels=labels,
                    preset="synfundus",
                    out=out,
                    workers=workers,
                    resize=resize,
                    check=check,
                    quality=90,
                    progress=False,
                )
            )

        t_tar = best_of(tar_cf, repeats)
        t_store = best_of(ours, repeats)
        t_store_header = best_of(lambda: ours(check="header"), repeats)
        t_naive = best_of(lambda: naive_resize(files, tmp / "naive", 256, 90), repeats)
        t_resize = best_of(lambda: ours(resize=256), repeats)

    rows = [
        Row("GNU tar cf (baseline: no checks, no index)", t_tar, n, nbytes),
        Row(
            f"retina-shard pack, store, --check decode, {workers} workers",
            t_store,
            n,
            nbytes,
            f"ratio {t_tar / t_store:.2f}",
        ),
        Row(
            f"retina-shard pack, store, --check header, {workers} workers",
            t_store_header,
            n,
            nbytes,
            f"ratio {t_tar / t_store_header:.2f}",
        ),
        Row("naive PIL open/resize/save loop, 1 process (baseline)", t_naive, n, nbytes),
        Row(
            f"retina-shard pack --resize 256, {workers} workers", t_resize, n, nbytes, f"ratio {t_naive / t_resize:.2f}"
        ),
    ]
    return BenchResult(
        benchmark="shard",
        ratio=t_tar / t_store,
        goal=STORE_GOAL,
        rows=rows,
        extra={
            "images": n,
            "image_px": 512,
            "workers": workers,
            "store_ratio_header_check": round(t_tar / t_store_header, 3),
            "resize_ratio": round(t_naive / t_resize, 3),
            "resize_goal": RESIZE_GOAL,
        },
    )

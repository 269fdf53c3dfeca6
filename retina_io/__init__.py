"""retina_io: bytes -> shards -> batches.

Label schema and dataset presets, fold assignment, the procedural fundus generator, the shard writer and verifier.
Import the submodules you need; this package import stays light (worker processes import it).
"""

import os as _os

# polars allocates through its own jemalloc, which keeps freed pages for about ten seconds before returning them. The
# packer frees large columns phase after phase, so its resident memory grew with every phase's garbage (measured at
# 200k images: a 506 MB peak, 440 MB with this). Read when polars is first imported, so it is set here, before any
# retina module imports polars; a value set by the user is kept.
_os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

from retina_io.schema import CLASSES, NUM_CLASSES  # noqa: E402

__all__ = ["CLASSES", "NUM_CLASSES"]

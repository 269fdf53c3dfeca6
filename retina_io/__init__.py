"""retina_io: bytes -> shards -> batches.

Label schema and dataset presets, fold assignment, the procedural fundus generator, the shard writer and verifier.
Import the submodules you need; this package import stays light (worker processes import it).
"""

from retina_io.schema import CLASSES, NUM_CLASSES

__all__ = ["CLASSES", "NUM_CLASSES"]

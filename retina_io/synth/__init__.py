"""Procedural fundus-photograph dataset generator (console script ``retina-synth``).

Draws colour fundus photographs from scratch (numpy + PIL): black surround, circular field, orange-red retina with
vignetting, a branching artery/vein tree leaving the optic disc, a macula 2.5 disc diameters temporal to the disc, and
for each of the 11 SynFundus-1M classes (:data:`retina_io.schema.CLASSES`) its own visible sign, sized relative to the
image so it survives downsampling to 64-128 px. Labels come from a small latent model (age, diabetes, hypertension,
high myopia), so prevalences are imbalanced and co-occur like screening data. Everything is deterministic for a seed
and byte-identical for any number of workers; toggling one class with the same seed changes only that class's sign.

Modules, in the order the data flows (see also docs/architecture.md):

- :mod:`~retina_io.synth.streams`: how every random draw is keyed by seed, image and component.
- :mod:`~retina_io.synth.labels`: the latent label model and each layout's label table (:func:`sample_labels`).
- :mod:`~retina_io.synth.scene`, :mod:`~retina_io.synth.vessels`, :mod:`~retina_io.synth.lesions`,
  :mod:`~retina_io.synth.render`: one image (:func:`render_fundus`, :func:`fundus_landmarks`).
- :mod:`~retina_io.synth.workers`: many images to files, in a process pool.
- :mod:`~retina_io.synth.layouts`: the published layouts (:data:`LAYOUTS`: ``synfundus``, ``Fundus/*.jpg`` +
  ``labels.csv``, and external-dataset-shaped ``rfmid``, ``airogs``, ``aptos``, ``eyepacs``, ``messidor2``) and
  :func:`generate_dataset`. Their column names are :mod:`retina_io.presets`'s, which reads them back.
- :mod:`~retina_io.synth.preview`: the contact sheet of every class (:func:`write_preview`).
- :mod:`~retina_io.synth.cli`: ``retina-synth``. :mod:`~retina_io.synth.errors`: :class:`SynthError`.
"""

from retina_io.synth.errors import SynthError
from retina_io.synth.labels import RFMID_MAP, sample_labels
from retina_io.synth.layouts import LAYOUTS, generate_dataset
from retina_io.synth.preview import caption_font, write_preview
from retina_io.synth.render import fundus_landmarks, render_fundus
from retina_io.synth.scene import FundusLandmarks

__all__ = [
    "LAYOUTS",
    "RFMID_MAP",
    "FundusLandmarks",
    "SynthError",
    "caption_font",
    "fundus_landmarks",
    "generate_dataset",
    "render_fundus",
    "sample_labels",
    "write_preview",
]

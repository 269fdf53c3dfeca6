"""``python -m retina_io.synth`` runs ``retina-synth``."""

from retina_io.synth.cli import main

raise SystemExit(main())

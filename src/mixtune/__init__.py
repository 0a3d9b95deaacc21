"""mixtune: compose multi-ability language models (mix, tune, merge, measure)."""

import os

# With the default active OpenMP waiting, two torch threads beside another busy
# process slow down 10-15x on a 2-core machine (shared/NOTES.md); passive
# waiting costs nothing when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["__version__"]

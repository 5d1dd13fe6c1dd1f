"""The names the command line offers for its choices, in a module that imports nothing heavy: `--help` and
argument errors come before torch and TorchRec load. The modules that implement each choice take its names
from here (and check at import that they implement exactly these)."""
from __future__ import annotations

# `--policy`: cpr.policies.POLICY_FACTORIES has one factory per name.
POLICY_NAMES = ("none", "full", "partial", "mfu", "ssu", "scar")
# `--lr-decay`: cpr.loop.
LR_DECAYS = ("linear", "none")
# `--quantize`: cpr.save.parts.
QUANTIZE_CHOICES = ("none", "int8", "int4", "auto")
# Each emulated domain is a parameter-server node holding a 1/num_domains slice of every table; the layout
# and every save's metadata grow with their number, and beyond this many a domain is a handful of rows.
MAX_VIRTUAL_DOMAINS = 1024

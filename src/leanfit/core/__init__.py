"""The adapter engine: hosts, injection, the adapted model's life, artifacts."""

from .artifact import load, read_manifest, save
from .fingerprint import fingerprint
from .hosts import AdapterHost
from .inject import find_targets
from .model import (AdapterSpec, activate, active, adapt, adapters, calibrate, deactivate, delete, merge,
                    set_rank, set_trainable, trainable_parameters, unmerge, unwrap)

"""Suite-wide settings: hypothesis runs derandomised (a fixed example sequence) unless asked otherwise, so a
fresh `make test` on CI cannot fail at random; `HYPOTHESIS_PROFILE=explore` draws new examples."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

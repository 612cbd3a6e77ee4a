"""Label conventions shared by the core, training and the service."""

from __future__ import annotations

# Train-id label maps mark unlabelled pixels with this value (Cityscapes' convention), in every dataset,
# loss, metric and feedback mask.
IGNORE_INDEX = 255

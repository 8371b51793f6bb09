"""The names of the tags sftops puts on MLflow runs and registered versions, and what they hold."""

from __future__ import annotations

import re

# Run tags copied onto the registered version: what made it.
LINEAGE_TAGS = ("base_model", "method", "data.curated_dvc_md5", "git.commit", "params.sha256")
REVISION_TAG = re.compile(r"^(model|data\.[A-Za-z0-9_.-]+)\.revision$")  # and the revisions it was made from
# Whether the version's data and code are recorded in git and DVC (the pipeline flow's record step sets them).
VERSIONED, VERSIONED_REASON = "data.versioned", "data.versioned_reason"
UNRECORDED = (
    "registered by a stage run outside the pipeline flow (dvc repro, sftops run): no git ref records "
    "its params and dvc.lock; run the flow (make pipeline) to record and promote"
)

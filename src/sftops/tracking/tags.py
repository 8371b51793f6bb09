"""The names of the tags sftops puts on MLflow runs and registered versions, and what they hold."""

from __future__ import annotations

import re

# Run tags copied onto the registered version: what made it.
LINEAGE_TAGS = ("base_model", "method", "data.curated_dvc_md5", "git.commit", "params.sha256")
REVISION_TAG = re.compile(r"^(model|data\.[A-Za-z0-9_.-]+)\.revision$")  # and the revisions it was made from
# Whether the version's data and code are recorded in git and DVC (the pipeline flow's record step sets them).
VERSIONED, VERSIONED_REASON = "data.versioned", "data.versioned_reason"
# Where that record can be restored, and the command that does it there (run as written, from where it says):
# anywhere the registry is read (the experiment pushed to a git remote, its outputs to a DVC remote), or only in
# the repository that ran it, on that machine (its git refs and DVC cache).
RESTORABLE, ANYWHERE, THIS_MACHINE = "data.restorable", "anywhere", "this-machine"
RESTORE, RESTORE_WHERE = "restore", "restore.where"
UNRECORDED = (
    "registered by a stage run outside the pipeline flow (dvc repro, sftops run): no git ref records "
    "its params and dvc.lock; run the flow (make pipeline) to record and promote"
)
# The export stage's verdicts on the version: export.gguf.<QUANT> (parity with the evaluated model) and export.vllm.
EXPORT_PREFIX = "export."

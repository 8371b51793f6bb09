"""`prefect deploy` for the deployments in prefect.yaml, working around a Prefect 3.8.8 client bug.

    python flows/deploy.py --all                # = prefect deploy --all (any `prefect deploy` options work)

After creating a deployment, `prefect deploy` asks the server which workers are online and sends
`"limit": null, "offset": null`; the server (on FastAPI 0.154, the newest that Prefect 3.8.8's server runs on)
answers 422, so the command fails after the first deployment. This sends numbers instead (it only asks whether
any worker is online) and runs Prefect's unchanged `deploy` command: prefect.yaml stays the one description
of the deployments.
"""

from __future__ import annotations

import sys

from prefect.cli import app
from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient

_read_workers = WorkPoolAsyncClient.read_workers_for_work_pool


async def _read_workers_with_limits(self, work_pool_name, worker_filter=None, offset=None, limit=None):
    return await _read_workers(self, work_pool_name, worker_filter, offset=offset or 0, limit=limit or 1)


if __name__ == "__main__":
    WorkPoolAsyncClient.read_workers_for_work_pool = _read_workers_with_limits
    sys.argv = ["prefect", "deploy", *sys.argv[1:]]
    app()

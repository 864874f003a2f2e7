"""Run the poller: `python -m services.poller` or `mailroom run poller`."""

from services.poller.worker import Poller
from shared.service import run_worker

if __name__ == "__main__":
    run_worker("poller", Poller)

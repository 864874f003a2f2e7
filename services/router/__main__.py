"""Run the router: `python -m services.router` or `mailroom run router`."""

from services.router.worker import Router
from shared.service import run_worker

if __name__ == "__main__":
    run_worker("router", Router)

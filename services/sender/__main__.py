"""Run the sender: `python -m services.sender` or `mailroom run sender`."""

from services.sender.worker import Sender
from shared.service import run_worker

if __name__ == "__main__":
    run_worker("sender", Sender)

.PHONY: run test check bench

# Set up and run the pipeline (poller, router, sender).
run:
	scripts/run.sh

# Set up and run lint, type checks and every test.
test:
	scripts/test.sh

bench:
	scripts/setup.sh dev
	.venv/bin/python -m benchmarks

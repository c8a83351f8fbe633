# The two commands of the README: `make run` (the main job) and `make test` (lint, types, the test suite).
.PHONY: setup run test lint

setup:
	@scripts/setup

run: setup
	.venv/bin/kafka-dlq demo

lint: setup
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests
	.venv/bin/mypy

test: lint
	.venv/bin/pytest
